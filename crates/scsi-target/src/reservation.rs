//! Reservations: RESERVE(6)/RELEASE(6) (SPC-2) and persistent reservations
//! (SPC-4 §5.9, PERSISTENT RESERVE IN/OUT), with the conflict table that
//! decides which commands a non-holder may still run.

use std::sync::atomic::Ordering;

use std::sync::Arc;

use crate::backend::SharedState;
use crate::cdb::{be_at, op, Cdb};
use crate::lu::LogicalUnit;
use crate::sense::{self, Sense};
use crate::{alloc_trunc, status, CmdResult, Fail, Nexus, NexusId, ScsiResponse, ScsiTask};

/// PERSISTENT RESERVE OUT service actions.
mod pro {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE: u8 = 0x06;
}

/// PERSISTENT RESERVE IN service actions.
mod pri {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// Persistent reservation types (SPC-4 table 169).
mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 0x1;
    pub const EXCLUSIVE_ACCESS: u8 = 0x3;
    pub const WRITE_EXCLUSIVE_RO: u8 = 0x5;
    pub const EXCLUSIVE_ACCESS_RO: u8 = 0x6;
    pub const WRITE_EXCLUSIVE_AR: u8 = 0x7;
    pub const EXCLUSIVE_ACCESS_AR: u8 = 0x8;

    pub fn valid(t: u8) -> bool {
        matches!(
            t,
            WRITE_EXCLUSIVE
                | EXCLUSIVE_ACCESS
                | WRITE_EXCLUSIVE_RO
                | EXCLUSIVE_ACCESS_RO
                | WRITE_EXCLUSIVE_AR
                | EXCLUSIVE_ACCESS_AR
        )
    }

    /// Every registrant holds an "all registrants" reservation.
    pub fn all_registrants(t: u8) -> bool {
        matches!(t, WRITE_EXCLUSIVE_AR | EXCLUSIVE_ACCESS_AR)
    }

    /// Registrants (not only the holder) may access the medium.
    pub fn registrants_allowed(t: u8) -> bool {
        matches!(
            t,
            WRITE_EXCLUSIVE_RO | EXCLUSIVE_ACCESS_RO | WRITE_EXCLUSIVE_AR | EXCLUSIVE_ACCESS_AR
        )
    }

    /// Non-holders may not even read.
    pub fn exclusive_access(t: u8) -> bool {
        matches!(
            t,
            EXCLUSIVE_ACCESS | EXCLUSIVE_ACCESS_RO | EXCLUSIVE_ACCESS_AR
        )
    }
}

/// An I_T nexus as persistent reservations know it: by port names, so a
/// registration outlives the session that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ItNexus {
    initiator: Arc<str>,
    target: Arc<str>,
    rtpi: u16,
}

impl ItNexus {
    fn of(n: &Nexus) -> Self {
        ItNexus {
            initiator: n.initiator_port_name.clone(),
            target: n.target_port_name.clone(),
            rtpi: n.relative_target_port_id,
        }
    }

    fn is(&self, initiator: &str, target: &str) -> bool {
        &*self.initiator == initiator && &*self.target == target
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Registration {
    /// The nexus that registered (for ALL_TG_PT: its initiator port is
    /// what counts, through whichever target port).
    nexus: ItNexus,
    key: u64,
    /// Registered with ALL_TG_PT: every I_T nexus of this initiator port,
    /// through every target port (of every gateway), shares it.
    all_tg_pt: bool,
}

impl Registration {
    /// Whether this registration is the one of the nexus with these port names.
    fn covers_names(&self, initiator: &str, target: &str) -> bool {
        if self.all_tg_pt {
            &*self.nexus.initiator == initiator
        } else {
            self.nexus.is(initiator, target)
        }
    }

    fn covers(&self, n: &ItNexus) -> bool {
        self.covers_names(&n.initiator, &n.target)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PrHold {
    /// The reserving nexus (for all-registrants types: whoever reserved).
    holder: ItNexus,
    ptype: u8,
}

/// Reservation state of one LU (behind `LogicalUnit::res`).
#[derive(Debug, Default)]
pub(crate) struct ResState {
    /// Holder of the RESERVE(6) reservation.
    pub reserve6: Option<NexusId>,
    generation: u32,
    registrations: Vec<Registration>,
    reservation: Option<PrHold>,
    /// Activate Persist Through Power Loss, as the last REGISTER set it;
    /// offered only where the state lives outside this process (a cluster).
    aptpl: bool,
}

/// What of `ResState` another gateway can change: compared before and
/// after a reload to tell this gateway's nexuses what happened to them.
#[derive(Clone, Debug, Default)]
struct SharedPart {
    generation: u32,
    registrations: Vec<Registration>,
    reservation: Option<PrHold>,
    aptpl: bool,
}

/// Registrations are bounded so one initiator cannot grow the table forever.
const MAX_REGISTRATIONS: usize = 256;

impl ResState {
    fn active(&self) -> bool {
        self.reserve6.is_some() || self.reservation.is_some()
    }

    fn registration(&self, n: &ItNexus) -> Option<&Registration> {
        self.registrations.iter().find(|r| r.covers(n))
    }

    /// Whether `n` is (one of) the nexus(es) of the holder's registration:
    /// a holder registered with ALL_TG_PT holds through every target port.
    fn holds(&self, h: &PrHold, n: &ItNexus) -> bool {
        h.holder == *n
            || self
                .registration(&h.holder)
                .is_some_and(|r| r.all_tg_pt && r.covers(n))
    }

    fn is_holder(&self, n: &ItNexus) -> bool {
        match &self.reservation {
            Some(h) if pr_type::all_registrants(h.ptype) => self.registration(n).is_some(),
            Some(h) => self.holds(h, n),
            None => false,
        }
    }

    fn shared_part(&self) -> SharedPart {
        SharedPart {
            generation: self.generation,
            registrations: self.registrations.clone(),
            reservation: self.reservation.clone(),
            aptpl: self.aptpl,
        }
    }

    fn restore(&mut self, p: SharedPart) {
        self.generation = p.generation;
        self.registrations = p.registrations;
        self.reservation = p.reservation;
        self.aptpl = p.aptpl;
    }

    /// The key READ RESERVATION and READ FULL STATUS report for the holder.
    fn holder_key(&self) -> u64 {
        match &self.reservation {
            Some(h) if pr_type::all_registrants(h.ptype) => 0,
            Some(h) => self.registration(&h.holder).map_or(0, |r| r.key),
            None => 0,
        }
    }

    /// Removes a registration; drops the reservation when it held it.
    /// Returns true if a (non all-registrants) reservation was released by it.
    fn unregister(&mut self, n: &ItNexus) -> bool {
        let held = match &self.reservation {
            Some(h) if !pr_type::all_registrants(h.ptype) => self.holds(h, n),
            _ => false,
        };
        self.registrations.retain(|r| !r.covers(n));
        match &self.reservation {
            Some(h) if pr_type::all_registrants(h.ptype) => {
                if self.registrations.is_empty() {
                    self.reservation = None;
                }
                false
            }
            Some(_) if held => {
                self.reservation = None;
                true
            }
            _ => false,
        }
    }
}

fn lock(lu: &LogicalUnit) -> std::sync::MutexGuard<'_, ResState> {
    lu.res.lock().unwrap_or_else(|e| e.into_inner())
}

// ----- persistent reservations kept in a shared store (several gateways) -----

const SHARED_MAGIC: &str = "ironstar-pr 1";

/// The persistent part of the state as the shared store keeps it: one line
/// per item, names as they are (iSCSI port names hold no spaces).
fn encode_shared(st: &ResState) -> Vec<u8> {
    let mut s = format!("{SHARED_MAGIC}\ngen {}\n", st.generation);
    if st.aptpl {
        s.push_str("aptpl 1\n");
    }
    for r in &st.registrations {
        let n = &r.nexus;
        // "rega": registered with ALL_TG_PT (a line older gateways refuse
        // whole rather than misread as one target port's).
        let kind = if r.all_tg_pt { "rega" } else { "reg" };
        s.push_str(&format!(
            "{kind} {:016x} {} {} {}\n",
            r.key, n.rtpi, n.initiator, n.target
        ));
    }
    if let Some(h) = &st.reservation {
        let n = &h.holder;
        s.push_str(&format!(
            "res {} {} {} {}\n",
            h.ptype, n.rtpi, n.initiator, n.target
        ));
    }
    s.into_bytes()
}

/// Reads what `encode_shared` wrote into `st` (RESERVE(6) stays local).
/// The bytes come from the cluster: anything malformed is refused whole.
fn decode_shared(data: &[u8], st: &mut ResState) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|_| "not UTF-8".to_string())?;
    let mut lines = text.lines();
    if lines.next() != Some(SHARED_MAGIC) {
        return Err("unknown format".into());
    }
    let nexus = |rtpi: &str, i: &str, t: &str| -> Result<ItNexus, String> {
        Ok(ItNexus {
            initiator: Arc::from(i),
            target: Arc::from(t),
            rtpi: rtpi.parse().map_err(|_| format!("bad port id {rtpi:?}"))?,
        })
    };
    let (mut generation, mut regs, mut res, mut aptpl) = (0u32, Vec::new(), None, false);
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["gen", g] => generation = g.parse().map_err(|_| format!("bad generation {g:?}"))?,
            ["aptpl", "1"] => aptpl = true,
            [kind @ ("reg" | "rega"), key, rtpi, i, t] if regs.len() < MAX_REGISTRATIONS => regs
                .push(Registration {
                    key: u64::from_str_radix(key, 16).map_err(|_| format!("bad key {key:?}"))?,
                    nexus: nexus(rtpi, i, t)?,
                    all_tg_pt: *kind == "rega",
                }),
            ["res", ptype, rtpi, i, t] => {
                let ptype: u8 = ptype.parse().map_err(|_| format!("bad type {ptype:?}"))?;
                if !pr_type::valid(ptype) {
                    return Err(format!("bad type {ptype}"));
                }
                res = Some(PrHold {
                    holder: nexus(rtpi, i, t)?,
                    ptype,
                });
            }
            [] | [""] => {}
            _ => return Err(format!("bad line {line:?}")),
        }
    }
    st.restore(SharedPart {
        generation,
        registrations: regs,
        reservation: res,
        aptpl,
    });
    Ok(())
}

fn store_failed(e: impl std::fmt::Display) -> Fail {
    tracing::warn!(error = %e, "shared persistent reservation state unavailable");
    sense::INTERNAL_TARGET_FAILURE.into()
}

/// Loads the shared state into `st`; returns the bytes it was read from.
/// What another gateway did to this gateway's registrants reaches their
/// nexuses here as the unit attention they would have got from it.
fn load_shared(
    lu: &LogicalUnit,
    store: &dyn SharedState,
    st: &mut ResState,
) -> Result<Vec<u8>, Fail> {
    let data = store.load().map_err(store_failed)?;
    let before = st.shared_part();
    decode_shared(&data, st).map_err(store_failed)?;
    if before.generation != st.generation || before.reservation != st.reservation {
        announce_remote_change(lu, &before, st);
    }
    Ok(data)
}

/// SPC-4 §5.13.11/12 unit attentions for changes made through another
/// gateway. Only this gateway's nexuses are matched (a registration names its
/// target port, and each gateway is its own), so each gateway tells its own.
fn announce_remote_change(lu: &LogicalUnit, before: &SharedPart, now: &ResState) {
    let lost: Vec<&Registration> = before
        .registrations
        .iter()
        .filter(|r| !now.registrations.iter().any(|n| n.nexus == r.nexus))
        .collect();
    // A CLEAR leaves nobody registered; a PREEMPT leaves its sender.
    let code = if now.registrations.is_empty() {
        sense::RESERVATIONS_PREEMPTED
    } else {
        sense::REGISTRATIONS_PREEMPTED
    };
    if !lost.is_empty() {
        lu.queue_ua_where(None, code, |i, t| lost.iter().any(|r| r.covers_names(i, t)));
    }
    // Released (not taken over) with registrants-only or all-registrants
    // type: the registrants who are left hear of it.
    let released = match (&before.reservation, &now.reservation) {
        (Some(h), None) => pr_type::registrants_allowed(h.ptype) && !now.registrations.is_empty(),
        _ => false,
    };
    if released {
        lu.queue_ua_where(None, sense::RESERVATIONS_RELEASED, |i, t| {
            now.registrations.iter().any(|r| r.covers_names(i, t))
        });
    }
}

/// Before each command: take in what another gateway changed.
pub(crate) fn refresh_shared(lu: &LogicalUnit) {
    let Some(store) = lu.backend.shared_state() else {
        return;
    };
    if store.take_reset() {
        // Another gateway reset the LU: as for a reset here, every nexus hears of it.
        lu.queue_ua_others(None, sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
    }
    if store.take_mode_changed() {
        crate::mode::load_shared(lu, store, true);
    }
    if store.take_changed() {
        let mut st = lock(lu);
        if load_shared(lu, store, &mut st).is_ok() {
            publish(lu, &st);
        }
    }
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

/// How a command fares under a persistent reservation it does not hold
/// (SPC-4 table 61, SBC-3 table 13).
#[derive(PartialEq, Eq)]
enum PrClass {
    /// Allowed whatever the reservation.
    Always,
    /// Reads the medium or its description: conflicts under Exclusive Access types.
    Read,
    /// Changes the medium or state: conflicts under every type.
    Write,
}

fn pr_class(cdb: &Cdb<'_>) -> PrClass {
    match cdb.opcode() {
        op::INQUIRY
        | op::REPORT_LUNS
        | op::REQUEST_SENSE
        | op::PERSISTENT_RESERVE_IN
        | op::PERSISTENT_RESERVE_OUT
        | op::MAINTENANCE_IN
        | op::TEST_UNIT_READY
        | op::READ_CAPACITY_10
        | op::RESERVE_6
        | op::RELEASE_6 => PrClass::Always,
        op::SERVICE_ACTION_IN_16 => PrClass::Always,
        op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::READ_DEFECT_DATA_10
        | op::READ_DEFECT_DATA_12 => PrClass::Read,
        _ => PrClass::Write,
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
    if let Some(h) = &st.reservation {
        let class = pr_class(cdb);
        if class == PrClass::Always {
            return Ok(());
        }
        let me = ItNexus::of(nexus);
        if st.is_holder(&me) {
            return Ok(());
        }
        let registered = st.registration(&me).is_some();
        if registered && pr_type::registrants_allowed(h.ptype) {
            return Ok(());
        }
        if class == PrClass::Read && !pr_type::exclusive_access(h.ptype) {
            return Ok(());
        }
        return Err(conflict());
    }
    Ok(())
}

pub(crate) fn reserve6(lu: &LogicalUnit, nexus: &Nexus, cdb: Cdb<'_>) -> CmdResult {
    // Third-party and extent reservations are obsolete.
    if cdb.byte(1) & 0x03 != 0 {
        return Err(Sense::invalid_cdb(1, Some(1)).into());
    }
    let mut st = lock(lu);
    if st.reservation.is_some() {
        return Err(conflict());
    }
    match st.reserve6 {
        Some(h) if h != nexus.id => return Err(conflict()),
        _ => st.reserve6 = Some(nexus.id),
    }
    publish(lu, &st);
    Ok(ScsiResponse::good_empty())
}

pub(crate) fn release6(lu: &LogicalUnit, nexus: &Nexus, _cdb: Cdb<'_>) -> CmdResult {
    let mut st = lock(lu);
    if st.reservation.is_some() {
        return Err(conflict());
    }
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

/// TransportID of an initiator port (SPC-4 §7.6.4). Names of the form
/// "name,i,0x<isid>" are iSCSI initiator ports (format 01b); anything else
/// is reported with format 00b. Padded to a multiple of four, at least 24.
fn transport_id(initiator: &str) -> Vec<u8> {
    let iscsi_port = initiator.contains(",i,0x");
    let mut name = initiator.as_bytes().to_vec();
    name.truncate(220);
    name.push(0);
    while name.len() % 4 != 0 || name.len() < 20 {
        name.push(0);
    }
    let mut v = Vec::with_capacity(4 + name.len());
    v.push(if iscsi_port { 0x40 } else { 0 } | 0x05);
    v.push(0);
    v.extend_from_slice(&(name.len() as u16).to_be_bytes());
    v.extend_from_slice(&name);
    v
}

pub(crate) fn pr_in(lu: &LogicalUnit, _t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    let alloc = u64::from(cdb.u16(7));
    let mut st = lock(lu);
    if let Some(store) = lu.backend.shared_state() {
        load_shared(lu, store, &mut st)?;
        publish(lu, &st);
    }
    let mut v = Vec::with_capacity(64);
    match cdb.service_action() {
        pri::READ_KEYS => {
            v.extend_from_slice(&st.generation.to_be_bytes());
            let len = (8 * st.registrations.len()) as u32;
            v.extend_from_slice(&len.to_be_bytes());
            for r in &st.registrations {
                v.extend_from_slice(&r.key.to_be_bytes());
            }
        }
        pri::READ_RESERVATION => {
            v.extend_from_slice(&st.generation.to_be_bytes());
            match &st.reservation {
                Some(h) => {
                    v.extend_from_slice(&16u32.to_be_bytes());
                    v.extend_from_slice(&st.holder_key().to_be_bytes());
                    v.extend_from_slice(&[0; 4]);
                    v.push(0);
                    v.push(h.ptype & 0x0F);
                    v.extend_from_slice(&[0; 2]);
                }
                None => v.extend_from_slice(&0u32.to_be_bytes()),
            }
        }
        pri::REPORT_CAPABILITIES => {
            let ptpl_c = lu.backend.shared_state().is_some();
            v.extend_from_slice(&8u16.to_be_bytes());
            // CRH: RESERVE(6)/RELEASE(6) conflict with PRs; ATP_C: ALL_TG_PT;
            // PTPL_C where the state lives in a cluster, not in this process.
            v.push(0x10 | 0x04 | u8::from(ptpl_c));
            // TMV: the type mask is valid; PTPL_A: APTPL is active.
            v.push(0x80 | u8::from(ptpl_c && st.aptpl));
            // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
            v.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
            v.push(0x01);
            v.extend_from_slice(&[0; 2]);
        }
        pri::READ_FULL_STATUS => {
            v.extend_from_slice(&st.generation.to_be_bytes());
            v.extend_from_slice(&[0; 4]);
            for r in &st.registrations {
                let holder = st.is_holder(&r.nexus);
                v.extend_from_slice(&r.key.to_be_bytes());
                v.extend_from_slice(&[0; 4]);
                v.push(u8::from(r.all_tg_pt) << 1 | u8::from(holder));
                v.push(match (&st.reservation, holder) {
                    (Some(h), true) => h.ptype & 0x0F,
                    _ => 0,
                });
                v.extend_from_slice(&[0; 4]);
                v.extend_from_slice(&r.nexus.rtpi.to_be_bytes());
                let tid = transport_id(&r.nexus.initiator);
                v.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                v.extend_from_slice(&tid);
            }
            let len = (v.len() - 8) as u32;
            v[4..8].copy_from_slice(&len.to_be_bytes());
        }
        _ => return Err(Sense::invalid_cdb(1, Some(4)).into()),
    }
    Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
}

/// The basic PERSISTENT RESERVE OUT parameter list (24 bytes).
struct ProParams {
    key: u64,
    sa_key: u64,
    all_tg_pt: bool,
    aptpl: bool,
}

fn parse_pro_params(lu: &LogicalUnit, cdb: &Cdb<'_>, data: &[u8]) -> Result<ProParams, Fail> {
    let plen = cdb.u32(5);
    if plen != 24 {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    if data.len() < 24 {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let flags = data[20];
    if flags & 0x08 != 0 {
        // SPEC_I_PT: we accept registrations only for the sending nexus.
        return Err(Sense::invalid_param(20, Some(3)).into());
    }
    let aptpl = flags & 0x01 != 0;
    if aptpl && lu.backend.shared_state().is_none() {
        // Kept in this process only: not through power loss (PTPL_C=0).
        return Err(Sense::invalid_param(20, Some(0)).into());
    }
    Ok(ProParams {
        key: be_at(data, 0, 8),
        sa_key: be_at(data, 8, 8),
        all_tg_pt: flags & 0x04 != 0,
        aptpl,
    })
}

pub(crate) fn pr_out(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    let action = cdb.service_action();
    if action > pro::REGISTER_AND_IGNORE {
        return Err(Sense::invalid_cdb(1, Some(4)).into());
    }
    let scope = cdb.byte(2) >> 4;
    let ptype = cdb.byte(2) & 0x0F;
    let p = parse_pro_params(lu, &cdb, t.data_out)?;
    let me = ItNexus::of(t.nexus);
    let mut st = lock(lu);
    if st.reserve6.is_some_and(|h| h != t.nexus.id) {
        return Err(conflict());
    }
    let Some(store) = lu.backend.shared_state() else {
        return pr_out_apply(lu, &mut st, t, &me, &p, action, scope, ptype);
    };
    // Read, apply, compare-and-swap; another gateway's change in between
    // means doing it again on the newer state.
    for _ in 0..16 {
        let old = load_shared(lu, store, &mut st)?;
        let loaded = st.shared_part();
        let r = pr_out_apply(lu, &mut st, t, &me, &p, action, scope, ptype);
        if r.is_err() {
            publish(lu, &st);
            return r;
        }
        if store
            .replace(&old, &encode_shared(&st))
            .map_err(store_failed)?
        {
            return r;
        }
        // Lost the race: back to what was loaded, so the reload compares
        // against the cluster's state and not against our unapplied change.
        st.restore(loaded);
    }
    Err(store_failed("the shared state kept changing under us"))
}

/// One PERSISTENT RESERVE OUT action applied to `st`.
#[allow(clippy::too_many_arguments)]
fn pr_out_apply(
    lu: &LogicalUnit,
    st: &mut ResState,
    t: &ScsiTask<'_>,
    me: &ItNexus,
    p: &ProParams,
    action: u8,
    scope: u8,
    ptype: u8,
) -> CmdResult {
    let r = match action {
        pro::REGISTER | pro::REGISTER_AND_IGNORE => {
            register(lu, st, t, me, p, action == pro::REGISTER_AND_IGNORE)
        }
        _ => {
            // Every other action needs the caller registered under that key.
            match st.registration(me) {
                Some(r) if r.key == p.key => {}
                _ => return Err(conflict()),
            }
            let takes_type = matches!(action, pro::RESERVE | pro::PREEMPT | pro::PREEMPT_AND_ABORT);
            if takes_type && (scope != 0 || !pr_type::valid(ptype)) {
                return Err(Sense::invalid_cdb(2, None).into());
            }
            match action {
                pro::RESERVE => reserve(st, me, ptype),
                pro::RELEASE => release(lu, st, t, me, scope, ptype),
                pro::CLEAR => {
                    clear(lu, st, t);
                    Ok(())
                }
                _ => preempt(lu, st, t, me, p, ptype),
            }
        }
    };
    publish(lu, st);
    r.map(|()| ScsiResponse::good_empty())
}

fn register(
    lu: &LogicalUnit,
    st: &mut ResState,
    t: &ScsiTask<'_>,
    me: &ItNexus,
    p: &ProParams,
    ignore: bool,
) -> Result<(), Fail> {
    match st.registration(me).map(|r| r.key) {
        None => {
            if !ignore && p.key != 0 {
                return Err(conflict());
            }
            if p.sa_key == 0 {
                return Ok(());
            }
            if p.all_tg_pt
                && st
                    .registrations
                    .iter()
                    .any(|r| r.nexus.initiator == me.initiator)
            {
                // ALL_TG_PT registers every target port of this initiator
                // port: one of them already holds a registration of its own.
                return Err(conflict());
            }
            if st.registrations.len() >= MAX_REGISTRATIONS {
                return Err(sense::INSUFFICIENT_REGISTRATION_RESOURCES.into());
            }
            st.registrations.push(Registration {
                nexus: me.clone(),
                key: p.sa_key,
                all_tg_pt: p.all_tg_pt,
            });
        }
        Some(current) => {
            // libiscsi's reservation tests unregister a second initiator
            // with the first initiator's key; we accept an unregister whose
            // key is any current registrant's, and refuse everything else
            // that does not match (SPC-4 §5.9.7 would refuse that too).
            let key_ok = ignore
                || p.key == current
                || (p.sa_key == 0 && st.registrations.iter().any(|r| r.key == p.key));
            if !key_ok {
                return Err(conflict());
            }
            if p.sa_key == 0 {
                let released = st.unregister(me);
                if released {
                    notify_registrants(lu, st, t, sense::RESERVATIONS_RELEASED);
                }
            } else if let Some(r) = st.registrations.iter_mut().find(|r| r.covers(me)) {
                r.key = p.sa_key;
            }
        }
    }
    // SPC-4 §5.13.5: the last successful REGISTER sets APTPL.
    st.aptpl = p.aptpl;
    st.generation = st.generation.wrapping_add(1);
    Ok(())
}

fn reserve(st: &mut ResState, me: &ItNexus, ptype: u8) -> Result<(), Fail> {
    match &st.reservation {
        Some(h) => {
            if st.is_holder(me) && h.ptype == ptype {
                Ok(())
            } else {
                Err(conflict())
            }
        }
        None => {
            st.reservation = Some(PrHold {
                holder: me.clone(),
                ptype,
            });
            Ok(())
        }
    }
}

fn release(
    lu: &LogicalUnit,
    st: &mut ResState,
    t: &ScsiTask<'_>,
    me: &ItNexus,
    scope: u8,
    ptype: u8,
) -> Result<(), Fail> {
    let Some(h) = st.reservation.clone() else {
        return Ok(());
    };
    if !st.is_holder(me) {
        return Ok(());
    }
    if scope != 0 || h.ptype != ptype {
        return Err(sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION.into());
    }
    st.reservation = None;
    if pr_type::registrants_allowed(h.ptype) {
        notify_registrants(lu, st, t, sense::RESERVATIONS_RELEASED);
    }
    Ok(())
}

fn clear(lu: &LogicalUnit, st: &mut ResState, t: &ScsiTask<'_>) {
    notify_registrants(lu, st, t, sense::RESERVATIONS_PREEMPTED);
    st.registrations.clear();
    st.reservation = None;
    st.generation = st.generation.wrapping_add(1);
}

fn preempt(
    lu: &LogicalUnit,
    st: &mut ResState,
    t: &ScsiTask<'_>,
    me: &ItNexus,
    p: &ProParams,
    ptype: u8,
) -> Result<(), Fail> {
    let all_reg = st
        .reservation
        .as_ref()
        .is_some_and(|h| pr_type::all_registrants(h.ptype));
    let victims: Vec<Registration>;
    match st.reservation.clone() {
        Some(_) if all_reg && p.sa_key == 0 => {
            // Preempting an all-registrants reservation: everyone else goes.
            victims = st
                .registrations
                .iter()
                .filter(|r| !r.covers(me))
                .cloned()
                .collect();
            st.reservation = Some(PrHold {
                holder: me.clone(),
                ptype,
            });
        }
        Some(h) if !all_reg && st.registration(&h.holder).map(|r| r.key) == Some(p.sa_key) => {
            victims = st
                .registrations
                .iter()
                .filter(|r| r.key == p.sa_key && !r.covers(me))
                .cloned()
                .collect();
            st.reservation = Some(PrHold {
                holder: me.clone(),
                ptype,
            });
        }
        _ => {
            if p.sa_key == 0 {
                return Err(Sense::invalid_param(8, None).into());
            }
            victims = st
                .registrations
                .iter()
                .filter(|r| r.key == p.sa_key)
                .cloned()
                .collect();
            if victims.is_empty() {
                return Err(conflict());
            }
        }
    }
    for v in &victims {
        st.unregister(&v.nexus);
        lu.queue_ua_where(Some(t.nexus.id), sense::REGISTRATIONS_PREEMPTED, |i, tg| {
            v.covers_names(i, tg)
        });
    }
    st.generation = st.generation.wrapping_add(1);
    Ok(())
}

/// Unit attention for the nexuses of every registrant other than the caller.
fn notify_registrants(lu: &LogicalUnit, st: &ResState, t: &ScsiTask<'_>, code: sense::SenseCode) {
    let me = ItNexus::of(t.nexus);
    let others: Vec<&Registration> = st.registrations.iter().filter(|r| !r.covers(&me)).collect();
    lu.queue_ua_where(Some(t.nexus.id), code, |i, tg| {
        others.iter().any(|r| r.covers_names(i, tg))
    });
}

#[cfg(test)]
mod tests {
    use crate::testutil::*;
    use crate::{sense, status, LogicalUnit, Nexus, ScsiResponse};

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

    fn prout(sa: u8, ptype: u8, key: u64, sa_key: u64) -> ([u8; 10], Vec<u8>) {
        let mut c = [0u8; 10];
        c[0] = 0x5F;
        c[1] = sa;
        c[2] = ptype;
        c[8] = 24;
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        (c, p)
    }

    fn pr(lu: &LogicalUnit, n: &Nexus, sa: u8, ptype: u8, key: u64, sa_key: u64) -> ScsiResponse {
        let (c, p) = prout(sa, ptype, key, sa_key);
        exec(lu, n, &c, &p)
    }

    fn prin(lu: &LogicalUnit, n: &Nexus, sa: u8) -> Vec<u8> {
        let r = exec(lu, n, &[0x5E, sa, 0, 0, 0, 0, 0, 0x40, 0, 0], &[]);
        assert_good(&r);
        r.data_in.to_vec()
    }

    fn keys(lu: &LogicalUnit, n: &Nexus) -> Vec<u64> {
        let d = prin(lu, n, 0);
        let len = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
        d[8..8 + len]
            .chunks(8)
            .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
            .collect()
    }

    const READ: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const WRITE: [u8; 10] = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    fn can_read(lu: &LogicalUnit, n: &Nexus) -> bool {
        exec(lu, n, &READ, &[]).status == status::GOOD
    }

    fn can_write(lu: &LogicalUnit, n: &Nexus) -> bool {
        let r = exec(lu, n, &WRITE, &[0u8; 512]);
        assert!(r.status == status::GOOD || r.status == status::RESERVATION_CONFLICT);
        r.status == status::GOOD
    }

    /// The state one "cluster" keeps; each gateway holds a handle that
    /// notices other gateways' changes by the version.
    #[derive(Default)]
    struct Shared {
        data: std::sync::Mutex<(u64, Vec<u8>)>,
        /// Resets announced so far, by gateway id.
        resets: std::sync::Mutex<Vec<usize>>,
        mode: std::sync::Mutex<ModeParams>,
    }

    /// Mode parameters by name, who stored them last, and how often.
    #[derive(Default)]
    struct ModeParams {
        values: Vec<(String, Vec<u8>)>,
        by: Option<usize>,
        version: u64,
    }

    struct Gateway {
        mem: crate::MemoryBackend,
        shared: std::sync::Arc<Shared>,
        seen: std::sync::atomic::AtomicU64,
        id: usize,
        resets_seen: std::sync::atomic::AtomicUsize,
        mode_seen: std::sync::atomic::AtomicU64,
    }

    impl super::SharedState for Gateway {
        fn load(&self) -> std::io::Result<Vec<u8>> {
            let d = self.shared.data.lock().unwrap();
            self.seen.store(d.0, std::sync::atomic::Ordering::SeqCst);
            Ok(if d.1.is_empty() {
                super::encode_shared(&super::ResState::default())
            } else {
                d.1.clone()
            })
        }
        fn replace(&self, expected: &[u8], new: &[u8]) -> std::io::Result<bool> {
            let mut d = self.shared.data.lock().unwrap();
            let cur = if d.1.is_empty() {
                super::encode_shared(&super::ResState::default())
            } else {
                d.1.clone()
            };
            if cur != expected {
                return Ok(false);
            }
            d.0 += 1;
            d.1 = new.to_vec();
            self.seen.store(d.0, std::sync::atomic::Ordering::SeqCst);
            Ok(true)
        }
        fn take_changed(&self) -> bool {
            let v = self.shared.data.lock().unwrap().0;
            self.seen.swap(v, std::sync::atomic::Ordering::SeqCst) != v
        }
        fn announce_reset(&self) {
            self.shared.resets.lock().unwrap().push(self.id);
        }
        fn take_reset(&self) -> bool {
            let r = self.shared.resets.lock().unwrap();
            let from = self
                .resets_seen
                .swap(r.len(), std::sync::atomic::Ordering::SeqCst);
            r.get(from..)
                .is_some_and(|new| new.iter().any(|&g| g != self.id))
        }
        fn load_mode_param(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
            let m = self.shared.mode.lock().unwrap();
            Ok(m.values
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone()))
        }
        fn store_mode_params(&self, params: &[(&str, &[u8])]) -> std::io::Result<()> {
            let mut m = self.shared.mode.lock().unwrap();
            for (name, value) in params {
                m.values.retain(|(n, _)| n != name);
                m.values.push((name.to_string(), value.to_vec()));
            }
            m.by = Some(self.id);
            m.version += 1;
            Ok(())
        }
        fn take_mode_changed(&self) -> bool {
            let m = self.shared.mode.lock().unwrap();
            let was = self
                .mode_seen
                .swap(m.version, std::sync::atomic::Ordering::SeqCst);
            was != m.version && m.by != Some(self.id)
        }
    }

    impl crate::Backend for Gateway {
        fn size_bytes(&self) -> u64 {
            self.mem.size_bytes()
        }
        fn read_at(&self, o: u64, b: &mut [u8]) -> std::io::Result<()> {
            self.mem.read_at(o, b)
        }
        fn write_at(&self, o: u64, d: &[u8]) -> std::io::Result<()> {
            self.mem.write_at(o, d)
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn unmap(&self, o: u64, l: u64) -> std::io::Result<()> {
            self.mem.unmap(o, l)
        }
        fn caps(&self) -> crate::BackendCaps {
            self.mem.caps()
        }
        fn shared_state(&self) -> Option<&dyn super::SharedState> {
            Some(self)
        }
    }

    fn gateway(shared: &std::sync::Arc<Shared>) -> std::sync::Arc<LogicalUnit> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        LogicalUnit::new(
            crate::LuConfig::default(),
            Box::new(Gateway {
                mem: crate::MemoryBackend::new(MIB),
                shared: shared.clone(),
                seen: Default::default(),
                id: NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                resets_seen: Default::default(),
                mode_seen: Default::default(),
            }),
        )
        .unwrap()
    }

    #[test]
    fn a_lun_reset_through_one_gateway_reaches_the_nexuses_of_the_others() {
        let cluster = std::sync::Arc::new(Shared::default());
        let (a, b) = (gateway(&cluster), gateway(&cluster));
        let x = ready_nexus(&a, 1);
        let y = ready_nexus(&b, 2);
        a.reset(Some(x.id));
        assert_good(&exec(&a, &x, &TUR, &[]));
        assert_check(
            &exec(&b, &y, &TUR, &[]),
            sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED,
        );
        assert_good(&exec(&b, &y, &TUR, &[]));
    }

    /// MODE SELECT(6) of the control page with SWP as given.
    fn set_swp(lu: &LogicalUnit, n: &Nexus, on: bool) -> crate::ScsiResponse {
        let mut data = vec![0u8; 4 + 12];
        data[4] = 0x0A;
        data[5] = 10;
        data[8] = if on { 0x08 } else { 0 };
        data[9] = 0x40; // TAS, as the current page has it
        data[12..14].copy_from_slice(&0xFFFFu16.to_be_bytes());
        exec(lu, n, &[0x15, 0x10, 0, 0, data.len() as u8, 0], &data)
    }

    #[test]
    fn mode_parameters_set_through_one_gateway_apply_on_all_and_outlive_a_restart() {
        let cluster = std::sync::Arc::new(Shared::default());
        let (a, b) = (gateway(&cluster), gateway(&cluster));
        let x = ready_nexus(&a, 1);
        let y = ready_nexus(&b, 2);
        assert!(can_write(&b, &y));
        assert_good(&set_swp(&a, &x, true));
        // B's nexus hears of it, then finds the LU write protected.
        assert_check(&exec(&b, &y, &TUR, &[]), sense::MODE_PARAMETERS_CHANGED);
        assert_check(
            &exec(&b, &y, &WRITE, &[0u8; 512]),
            sense::SOFTWARE_WRITE_PROTECTED,
        );
        assert!(can_read(&b, &y));
        // A gateway started now applies it from the start.
        let c = gateway(&cluster);
        let z = ready_nexus(&c, 3);
        assert_check(
            &exec(&c, &z, &WRITE, &[0u8; 512]),
            sense::SOFTWARE_WRITE_PROTECTED,
        );
        // Cleared through B: A and C write again, and A's own nexus heard of it.
        assert_good(&set_swp(&b, &y, false));
        assert_check(&exec(&a, &x, &TUR, &[]), sense::MODE_PARAMETERS_CHANGED);
        assert!(can_write(&a, &x));
        assert_check(&exec(&c, &z, &TUR, &[]), sense::MODE_PARAMETERS_CHANGED);
        assert!(can_write(&c, &z));
        // B's own nexus is not told of its own change.
        assert!(can_write(&b, &y));
    }

    /// The same initiator port through another gateway's target port.
    fn via(n: &Nexus, tpgt: u16) -> Nexus {
        let mut n = n.clone();
        n.target_port_name = format!("iqn.2024-01.test:tgt,t,0x{tpgt:04x}").into();
        n.relative_target_port_id = tpgt;
        n
    }

    #[test]
    fn a_reservation_through_one_gateway_binds_the_others_and_outlives_a_restart() {
        let cluster = std::sync::Arc::new(Shared::default());
        let (a, b) = (gateway(&cluster), gateway(&cluster));
        let x = ready_nexus(&a, 1);
        let y_on_b = via(&ready_nexus(&b, 2), 2);
        let _ = exec(&b, &y_on_b, &TUR, &[]);
        assert_good(&pr(&a, &x, 0, 0, 0, 0xAA));
        // Write Exclusive through A: Y through B may read, not write.
        assert_good(&pr(&a, &x, 1, 1, 0xAA, 0));
        assert!(can_read(&b, &y_on_b));
        assert!(!can_write(&b, &y_on_b));
        assert_eq!(keys(&b, &y_on_b), vec![0xAA]);
        // A second reservation through B conflicts; X through A still writes.
        assert_good(&pr(&b, &y_on_b, 0, 0, 0, 0xBB));
        assert_eq!(
            pr(&b, &y_on_b, 1, 1, 0xBB, 0).status,
            status::RESERVATION_CONFLICT
        );
        assert!(can_write(&a, &x));
        // Gateway A restarts: the new process sees both keys and the reservation.
        drop(a);
        let a2 = gateway(&cluster);
        let x2 = ready_nexus(&a2, 1);
        assert_eq!(keys(&a2, &x2), vec![0xAA, 0xBB]);
        assert!(can_write(&a2, &x2));
        let z = ready_nexus(&a2, 3);
        assert!(!can_write(&a2, &z));
        // Released through the new A: B writes again.
        assert_good(&pr(&a2, &x2, 2, 1, 0xAA, 0));
        assert!(can_write(&b, &y_on_b));
    }

    #[test]
    fn shared_state_round_trips_and_refuses_garbage() {
        let mut st = super::ResState {
            generation: 7,
            ..Default::default()
        };
        st.registrations.push(super::Registration {
            nexus: super::ItNexus::of(&nexus(1)),
            key: 0xDEAD,
            all_tg_pt: false,
        });
        st.registrations.push(super::Registration {
            nexus: super::ItNexus::of(&nexus(2)),
            key: 0xBEEF,
            all_tg_pt: true,
        });
        st.aptpl = true;
        st.reservation = Some(super::PrHold {
            holder: super::ItNexus::of(&nexus(1)),
            ptype: 3,
        });
        assert_eq!(
            super::encode_shared(&super::ResState::default()),
            crate::rbd::EMPTY_PR_STATE
        );
        let mut back = super::ResState::default();
        super::decode_shared(&super::encode_shared(&st), &mut back).unwrap();
        assert_eq!(back.generation, 7);
        assert_eq!(back.registrations, st.registrations);
        assert!(back.aptpl);
        assert_eq!(back.reservation.as_ref().map(|h| h.ptype), Some(3));
        for bad in [
            "",
            "ironstar-pr 1\nres 9 1 a b\n",
            "ironstar-pr 1\nreg zz 1 a b\n",
        ] {
            assert!(
                super::decode_shared(bad.as_bytes(), &mut back).is_err(),
                "{bad:?}"
            );
        }
    }

    fn pr_flags(
        lu: &LogicalUnit,
        n: &Nexus,
        sa: u8,
        key: u64,
        sa_key: u64,
        flags: u8,
    ) -> ScsiResponse {
        let (c, mut p) = prout(sa, 0, key, sa_key);
        p[20] = flags;
        exec(lu, n, &c, &p)
    }

    const ALL_TG_PT: u8 = 0x04;
    const APTPL: u8 = 0x01;

    #[test]
    fn all_tg_pt_registers_the_initiator_through_every_target_port() {
        let lu = mem_lu();
        let x1 = ready_nexus(&lu, 1);
        let x2 = via(&x1, 2);
        let _ = exec(&lu, &x2, &TUR, &[]);
        let other = ready_nexus(&lu, 3);
        let caps = prin(&lu, &x1, 2);
        assert_eq!(caps[2] & 0x04, 0x04, "ATP_C");
        assert_good(&pr_flags(&lu, &x1, 0, 0, 0xA1, ALL_TG_PT));
        // Registered through the other port too: one registration, one key.
        assert_eq!(keys(&lu, &x2), vec![0xA1]);
        assert_good(&pr(&lu, &x2, 1, 1, 0xA1, 0));
        // The holder writes through both ports; nobody else does.
        assert!(can_write(&lu, &x1));
        assert!(can_write(&lu, &x2));
        assert!(!can_write(&lu, &other));
        let full = prin(&lu, &other, 3);
        assert_eq!(full[8 + 12], 0x02 | 0x01, "ALL_TG_PT and R_HOLDER");
        // Unregistering through either port removes it, and the reservation.
        assert_good(&pr(&lu, &x1, 0, 0, 0xA1, 0));
        assert!(keys(&lu, &x2).is_empty());
        assert!(can_write(&lu, &other));
        // A port already registered on its own: ALL_TG_PT through another conflicts.
        assert_good(&pr(&lu, &x1, 0, 0, 0, 0xB1));
        assert_eq!(
            pr_flags(&lu, &x2, 0, 0, 0xB2, ALL_TG_PT).status,
            status::RESERVATION_CONFLICT
        );
    }

    #[test]
    fn aptpl_is_offered_where_the_state_lives_in_the_cluster() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        assert_eq!(prin(&lu, &a, 2)[2] & 0x01, 0, "no PTPL_C in one process");
        let cluster = std::sync::Arc::new(Shared::default());
        let g = gateway(&cluster);
        let x = ready_nexus(&g, 1);
        let caps = prin(&g, &x, 2);
        assert_eq!(
            (caps[2] & 0x01, caps[3] & 0x01),
            (1, 0),
            "PTPL_C, not PTPL_A"
        );
        assert_good(&pr_flags(&g, &x, 0, 0, 0xA1, APTPL));
        drop(g);
        let g2 = gateway(&cluster);
        let x2 = ready_nexus(&g2, 1);
        assert_eq!(prin(&g2, &x2, 2)[3] & 0x01, 1, "PTPL_A after a restart");
        assert_eq!(keys(&g2, &x2), vec![0xA1]);
        // The last REGISTER decides: a key change without APTPL turns it off.
        assert_good(&pr(&g2, &x2, 0, 0, 0xA1, 0xA2));
        assert_eq!(prin(&g2, &x2, 2)[3] & 0x01, 0);
    }

    #[test]
    fn what_another_gateway_does_to_a_registrant_reaches_it_as_unit_attention() {
        let cluster = std::sync::Arc::new(Shared::default());
        let (a, b) = (gateway(&cluster), gateway(&cluster));
        let x = ready_nexus(&a, 1);
        let y = via(&ready_nexus(&b, 2), 2);
        let _ = exec(&b, &y, &TUR, &[]);
        // Y preempts X's registration (and its reservation) through B.
        assert_good(&pr(&a, &x, 0, 0, 0, 0xAA));
        assert_good(&pr(&b, &y, 0, 0, 0, 0xBB));
        assert_good(&pr(&a, &x, 1, 1, 0xAA, 0));
        assert_good(&pr(&b, &y, 4, 1, 0xBB, 0xAA));
        assert_check(&exec(&a, &x, &TUR, &[]), sense::REGISTRATIONS_PREEMPTED);
        assert_good(&exec(&a, &x, &TUR, &[]));
        assert_good(&exec(&b, &y, &TUR, &[]));
        // A registrants-only reservation released through B: X hears of it.
        assert_good(&pr(&a, &x, 0, 0, 0, 0xAA));
        assert_good(&pr(&b, &y, 2, 1, 0xBB, 0));
        assert_good(&pr(&b, &y, 1, 5, 0xBB, 0));
        assert_good(&exec(&a, &x, &TUR, &[]));
        assert_good(&pr(&b, &y, 2, 5, 0xBB, 0));
        assert_check(&exec(&a, &x, &TUR, &[]), sense::RESERVATIONS_RELEASED);
        // CLEAR through B: every registrant through A hears it was preempted.
        assert_good(&pr(&b, &y, 3, 0, 0xBB, 0));
        assert_check(&exec(&a, &x, &TUR, &[]), sense::RESERVATIONS_PREEMPTED);
        assert_good(&exec(&a, &x, &TUR, &[]));
    }

    #[test]
    fn register_read_keys_and_unregister() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        assert_good(&pr(&lu, &a, 6, 0, 0, 0xAA));
        assert_eq!(keys(&lu, &a), vec![0xAA]);
        // Re-register with a wrong RESERVATION KEY conflicts.
        assert_eq!(
            pr(&lu, &a, 0, 0, 0, 0xAB).status,
            status::RESERVATION_CONFLICT
        );
        assert_good(&pr(&lu, &a, 0, 0, 0xAA, 0));
        assert!(keys(&lu, &a).is_empty());
        let d = prin(&lu, &a, 0);
        assert_eq!(
            u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
            2,
            "generation"
        );
    }

    #[test]
    fn report_capabilities_lists_all_six_types() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let d = prin(&lu, &a, 2);
        assert_eq!(&d[..2], &[0, 8]);
        assert_eq!(d[3] & 0x80, 0x80);
        assert_eq!(d[4], 0xEA);
        assert_eq!(d[5], 0x01);
    }

    #[test]
    fn prin_unknown_service_action_is_invalid_field() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        for sa in 4..0x20u8 {
            let r = exec(&lu, &a, &[0x5E, sa, 0, 0, 0, 0, 0, 0x40, 0, 0], &[]);
            assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        }
    }

    #[test]
    fn prout_with_aptpl_or_bad_length_is_rejected() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let (c, mut p) = prout(6, 0, 0, 1);
        p[20] = 1;
        assert_check(
            &exec(&lu, &a, &c, &p),
            sense::INVALID_FIELD_IN_PARAMETER_LIST,
        );
        let (mut c, p) = prout(6, 0, 0, 1);
        c[8] = 20;
        assert_check(
            &exec(&lu, &a, &c, &p[..20]),
            sense::PARAMETER_LIST_LENGTH_ERROR,
        );
    }

    /// (registered other can read, can write, unregistered other can read, can write)
    fn access(ptype: u8) -> (bool, bool, bool, bool) {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        assert_good(&pr(&lu, &a, 6, 0, 0, 0x1));
        assert_good(&pr(&lu, &b, 6, 0, 0, 0x2));
        assert_good(&pr(&lu, &a, 1, ptype, 0x1, 0));
        let d = prin(&lu, &a, 1);
        assert_eq!(d[7], 16);
        assert_eq!(d[21] & 0xF, ptype);
        let want_key = if ptype >= 7 { 0 } else { 1 };
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), want_key);
        assert!(can_read(&lu, &a) && can_write(&lu, &a));
        let reg = (can_read(&lu, &b), can_write(&lu, &b));
        // libiscsi unregisters the second initiator with the first's key.
        assert_good(&pr(&lu, &b, 0, 0, 0x1, 0));
        let unreg = (can_read(&lu, &b), can_write(&lu, &b));
        assert_good(&pr(&lu, &a, 2, ptype, 0x1, 0));
        assert_good(&pr(&lu, &a, 0, 0, 0x1, 0));
        (reg.0, reg.1, unreg.0, unreg.1)
    }

    #[test]
    fn reservation_access_follows_spc4_table_for_every_type() {
        assert_eq!(access(3), (false, false, false, false), "EA");
        assert_eq!(access(1), (true, false, true, false), "WE");
        assert_eq!(access(6), (true, true, false, false), "EARO");
        assert_eq!(access(5), (true, true, true, false), "WERO");
        assert_eq!(access(8), (true, true, false, false), "EAAR");
        assert_eq!(access(7), (true, true, true, false), "WEAR");
    }

    #[test]
    fn reserve_by_unregistered_or_other_nexus_conflicts() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        assert_eq!(
            pr(&lu, &a, 1, 1, 0x1, 0).status,
            status::RESERVATION_CONFLICT
        );
        assert_good(&pr(&lu, &a, 6, 0, 0, 0x1));
        assert_good(&pr(&lu, &b, 6, 0, 0, 0x2));
        assert_good(&pr(&lu, &a, 1, 1, 0x1, 0));
        assert_good(&pr(&lu, &a, 1, 1, 0x1, 0));
        assert_eq!(
            pr(&lu, &b, 1, 1, 0x2, 0).status,
            status::RESERVATION_CONFLICT
        );
        assert_eq!(
            pr(&lu, &a, 1, 3, 0x1, 0).status,
            status::RESERVATION_CONFLICT
        );
        assert_check(&pr(&lu, &a, 1, 2, 0x1, 0), sense::INVALID_FIELD_IN_CDB);
        // RESERVE(6) conflicts with a persistent reservation.
        assert_eq!(
            exec(&lu, &a, &RESERVE, &[]).status,
            status::RESERVATION_CONFLICT
        );
    }

    #[test]
    fn release_with_wrong_type_is_invalid_release() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        assert_good(&pr(&lu, &a, 6, 0, 0, 0x1));
        assert_good(&pr(&lu, &a, 1, 5, 0x1, 0));
        assert_check(
            &pr(&lu, &a, 2, 6, 0x1, 0),
            sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
        );
        assert_good(&pr(&lu, &a, 2, 5, 0x1, 0));
        assert_eq!(prin(&lu, &a, 1)[7], 0);
    }

    #[test]
    fn release_of_registrants_only_reservation_tells_other_registrants() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        assert_good(&pr(&lu, &a, 6, 0, 0, 0x1));
        assert_good(&pr(&lu, &b, 6, 0, 0, 0x2));
        assert_good(&pr(&lu, &a, 1, 5, 0x1, 0));
        assert_good(&pr(&lu, &a, 2, 5, 0x1, 0));
        assert_check(&exec(&lu, &b, &TUR, &[]), sense::RESERVATIONS_RELEASED);
        assert_good(&exec(&lu, &a, &TUR, &[]));
    }

    #[test]
    fn clear_removes_everything_and_tells_registrants() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        assert_good(&pr(&lu, &a, 6, 0, 0, 0x1));
        assert_good(&pr(&lu, &b, 6, 0, 0, 0x2));
        assert_good(&pr(&lu, &a, 1, 3, 0x1, 0));
        assert_eq!(
            pr(&lu, &b, 3, 0, 0x3, 0).status,
            status::RESERVATION_CONFLICT
        );
        assert_good(&pr(&lu, &a, 3, 0, 0x1, 0));
        assert!(keys(&lu, &a).is_empty());
        assert_check(&exec(&lu, &b, &TUR, &[]), sense::RESERVATIONS_PREEMPTED);
        assert!(can_write(&lu, &b));
    }

    #[test]
    fn preempt_removes_registration_without_reservation() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        assert_good(&pr(&lu, &a, 6, 0, 0, 0x1));
        assert_good(&pr(&lu, &b, 6, 0, 0, 0x2));
        assert_good(&pr(&lu, &a, 4, 1, 0x1, 0x2));
        assert_eq!(keys(&lu, &a), vec![0x1]);
        assert_check(&exec(&lu, &b, &TUR, &[]), sense::REGISTRATIONS_PREEMPTED);
        assert_eq!(
            pr(&lu, &a, 4, 1, 0x1, 0x9).status,
            status::RESERVATION_CONFLICT
        );
    }

    #[test]
    fn preempt_takes_over_the_holders_reservation() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        assert_good(&pr(&lu, &a, 6, 0, 0, 0x1));
        assert_good(&pr(&lu, &b, 6, 0, 0, 0x2));
        assert_good(&pr(&lu, &a, 1, 3, 0x1, 0));
        assert_good(&pr(&lu, &b, 5, 1, 0x2, 0x1));
        let d = prin(&lu, &b, 1);
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 0x2);
        assert_eq!(d[21], 1);
        assert_eq!(keys(&lu, &b), vec![0x2]);
    }

    #[test]
    fn read_full_status_describes_each_registrant() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        assert_good(&pr(&lu, &a, 6, 0, 0, 0x77));
        assert_good(&pr(&lu, &a, 1, 1, 0x77, 0));
        let d = prin(&lu, &a, 3);
        let len = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
        assert_eq!(len + 8, d.len());
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 0x77);
        assert_eq!(d[20] & 1, 1);
        assert_eq!(d[21], 1);
        assert_eq!(d[32], 0x45);
    }

    #[test]
    fn registrations_survive_nexus_loss() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        assert_good(&pr(&lu, &a, 6, 0, 0, 0x5));
        lu.nexus_lost(a.id);
        let a2 = ready_nexus(&lu, 1);
        assert_eq!(keys(&lu, &a2), vec![0x5]);
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
