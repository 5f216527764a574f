//! The logical unit: configuration, per-nexus unit attentions, shared state
//! (mode parameters, reservations), statistics, and the dispatcher that hands
//! each CDB to its command family.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use crate::backend::{Backend, BackendCaps};
use crate::cdb::{op, sa, Cdb};
use crate::reservation::ResState;
use crate::sense::{self, Sense, SenseCode};
use crate::{
    mode, opcodes, reservation, sanitize, sbc, spc, status, vpd, CmdResult, Fail, Nexus, NexusId,
    ScsiResponse, ScsiTask,
};

/// How a logical unit presents itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuConfig {
    /// 512 or 4096 (any power of two from 512 to 65536 is accepted).
    pub block_size: u32,
    /// Up to 8 ASCII characters, "IRONSTAR".
    pub vendor: String,
    /// Up to 16 ASCII characters.
    pub product: String,
    /// Up to 4 ASCII characters.
    pub revision: String,
    /// Unit serial number (VPD 80h), ASCII.
    pub serial: String,
    /// The NAA 6 designator's high 64 bits (the top nibble is forced to 6);
    /// the low 64 bits are derived from the serial.
    pub naa_id: u64,
    /// Write-back caching (WCE) at start.
    pub write_cache: bool,
    pub read_only: bool,
    /// Report logical block provisioning (UNMAP, WRITE SAME with UNMAP, LBPME).
    pub thin_provisioning: bool,
}

impl Default for LuConfig {
    fn default() -> Self {
        LuConfig {
            block_size: 512,
            vendor: "IRONSTAR".into(),
            product: "MEMORY LU".into(),
            revision: "0001".into(),
            serial: "0000000000000001".into(),
            naa_id: 0x6000_0000_0000_0001,
            write_cache: true,
            read_only: false,
            thin_provisioning: true,
        }
    }
}

/// Why a logical unit could not be created or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LuError {
    #[error("block size {0} is not a power of two between 512 and 65536")]
    InvalidBlockSize(u32),
    #[error("backend of {size} bytes holds no whole block of {block_size} bytes")]
    TooSmall { size: u64, block_size: u32 },
    #[error("{field} must be printable ASCII of at most {max} characters")]
    InvalidString { field: &'static str, max: usize },
    #[error("the backend cannot change its size: {0}")]
    Resize(#[source] std::io::Error),
}

/// Counters of one logical unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LuStats {
    pub read_commands: u64,
    pub read_bytes: u64,
    pub write_commands: u64,
    pub write_bytes: u64,
    pub other_commands: u64,
    /// Commands that ended with CHECK CONDITION or another non-GOOD status.
    pub errors: u64,
    pub unit_attentions: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub read_commands: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_commands: AtomicU64,
    pub write_bytes: AtomicU64,
    pub other_commands: AtomicU64,
    pub errors: AtomicU64,
    pub unit_attentions: AtomicU64,
}

/// Direction of a command's data transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDirection {
    None,
    In,
    Out,
}

/// Unit attentions are queued per nexus; at most this many distinct ones.
const UA_QUEUE_MAX: usize = 8;

struct NexusEntry {
    pending: AtomicBool,
    ua: Mutex<VecDeque<SenseCode>>,
    /// The I_T nexus identity, for persistent reservations' unit attentions.
    initiator: Arc<str>,
    target: Arc<str>,
}

impl NexusEntry {
    fn new(nexus: &Nexus) -> Self {
        NexusEntry {
            pending: AtomicBool::new(false),
            ua: Mutex::new(VecDeque::new()),
            initiator: nexus.initiator_port_name.clone(),
            target: nexus.target_port_name.clone(),
        }
    }

    fn push(&self, code: SenseCode) {
        let mut q = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        if code.asc == 0x29 {
            // A reset condition subsumes whatever was pending before it.
            q.clear();
        }
        if !q.contains(&code) && q.len() < UA_QUEUE_MAX {
            q.push_back(code);
        }
        self.pending.store(true, Ordering::Release);
    }

    /// Drops a pending `code` without reporting it.
    fn clear(&self, code: SenseCode) {
        if !self.pending.load(Ordering::Acquire) {
            return;
        }
        let mut q = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|c| *c != code);
        if q.is_empty() {
            self.pending.store(false, Ordering::Release);
        }
    }

    fn pop(&self) -> Option<SenseCode> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        let c = q.pop_front();
        if q.is_empty() {
            self.pending.store(false, Ordering::Release);
        }
        c
    }
}

/// One logical unit: a backend plus the SCSI state around it.
pub struct LogicalUnit {
    pub(crate) config: LuConfig,
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) caps: BackendCaps,
    pub(crate) block_shift: u32,
    blocks: AtomicU64,
    nexuses: RwLock<HashMap<NexusId, Arc<NexusEntry>>>,
    /// Mode parameters that commands consult on the fast path.
    pub(crate) wce: AtomicBool,
    pub(crate) swp: AtomicBool,
    /// Serialises MODE SELECT so its read-compare-update is whole.
    pub(crate) mode_lock: Mutex<()>,
    /// COMPARE AND WRITE holds this for writing; every other write holds it
    /// for reading, so the compare and the write are atomic against them.
    pub(crate) write_order: RwLock<()>,
    pub(crate) res: Mutex<ResState>,
    /// Quick check that no RESERVE(6) or persistent reservation is held.
    pub(crate) res_active: AtomicBool,
    pub(crate) counters: Counters,
    /// Target port groups and their states (empty: one group, optimized).
    alua: RwLock<Arc<[crate::AluaGroup]>>,
    /// The threads that run this LU's commands when its store may block;
    /// made on first use.
    io_pool: OnceLock<crate::iopool::IoPool>,
    /// A sanitize running, or failed (SBC-4 §4.11).
    pub(crate) sanitize: sanitize::SanitizeState,
    /// This LU, for work that outlives the command that started it.
    me: Weak<LogicalUnit>,
}

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("serial", &self.config.serial)
            .field("block_size", &self.config.block_size)
            .field("blocks", &self.num_blocks())
            .finish()
    }
}

fn check_ascii(s: &str, field: &'static str, max: usize) -> Result<(), LuError> {
    if s.len() > max || !s.bytes().all(|b| (0x20..0x7F).contains(&b)) {
        return Err(LuError::InvalidString { field, max });
    }
    Ok(())
}

impl LogicalUnit {
    pub fn new(config: LuConfig, backend: Box<dyn Backend>) -> Result<Arc<Self>, LuError> {
        let bs = config.block_size;
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(LuError::InvalidBlockSize(bs));
        }
        check_ascii(&config.vendor, "vendor", 8)?;
        check_ascii(&config.product, "product", 16)?;
        check_ascii(&config.revision, "revision", 4)?;
        check_ascii(&config.serial, "serial", 64)?;
        let block_shift = bs.trailing_zeros();
        let size = backend.size_bytes();
        let blocks = size >> block_shift;
        if blocks == 0 {
            return Err(LuError::TooSmall {
                size,
                block_size: bs,
            });
        }
        let caps = backend.caps();
        let lu = Arc::new_cyclic(|me| LogicalUnit {
            wce: AtomicBool::new(config.write_cache),
            swp: AtomicBool::new(false),
            config,
            backend,
            caps,
            block_shift,
            blocks: AtomicU64::new(blocks),
            nexuses: RwLock::new(HashMap::new()),
            mode_lock: Mutex::new(()),
            write_order: RwLock::new(()),
            res: Mutex::new(ResState::default()),
            res_active: AtomicBool::new(false),
            counters: Counters::default(),
            alua: RwLock::new(Arc::from(Vec::new())),
            io_pool: OnceLock::new(),
            sanitize: sanitize::SanitizeState::default(),
            me: me.clone(),
        });
        if let Some(shared) = lu.backend.shared_state() {
            // What the LU's other gateways run under, not this config's defaults.
            crate::mode::load_shared(&lu, shared, false);
        }
        Ok(lu)
    }

    /// This LU as an `Arc` (every LU is made in one).
    pub(crate) fn arc(&self) -> Option<Arc<LogicalUnit>> {
        self.me.upgrade()
    }

    pub fn config(&self) -> &LuConfig {
        &self.config
    }

    pub fn block_size(&self) -> u32 {
        self.config.block_size
    }

    /// Capacity in logical blocks.
    pub fn num_blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    /// True when the port must run `execute` on a blocking thread.
    pub fn may_block(&self) -> bool {
        self.caps.may_block
    }

    /// True when `execute` of this CDB waits for an operation of the LU
    /// that may last minutes (SANITIZE without IMMED returns when the
    /// sanitize ends): the port runs it where waiting holds up nothing,
    /// neither the connection nor the LU's I/O threads.
    pub fn waits_long(&self, cdb: &[u8]) -> bool {
        sanitize::waits_for_operation(cdb)
    }

    /// Runs `job` (typically [`execute`](Self::execute) and sending its
    /// response) on this LU's I/O threads: at most
    /// [`io_threads`](Self::io_threads) at once, started on demand and
    /// ended when idle. For LUs that [`may_block`](Self::may_block).
    pub fn spawn_io(&self, job: impl FnOnce() + Send + 'static) {
        self.pool().spawn(Box::new(job));
    }

    /// How many commands of this LU run at once on its I/O threads (the
    /// backend's [`Backend::io_threads`], the LU property `io_threads` of
    /// file LUs).
    pub fn io_threads(&self) -> usize {
        self.backend.io_threads().max(1)
    }

    fn pool(&self) -> &crate::iopool::IoPool {
        self.io_pool.get_or_init(|| {
            let name = format!("lu-io-{:x}", self.config.naa_id & 0xFFFF_FFFF);
            crate::iopool::IoPool::new(self.io_threads(), name)
        })
    }

    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: how many logical blocks
    /// share one of the backend's physical blocks, as a power of two.
    pub(crate) fn lbppbe(&self) -> u8 {
        let phys = self.backend.physical_block_size();
        if !phys.is_power_of_two() || phys <= self.config.block_size {
            return 0;
        }
        let e = phys.trailing_zeros().saturating_sub(self.block_shift);
        u8::try_from(e.min(15)).unwrap_or(0)
    }

    /// Whether this LU reports logical block provisioning (LBPME).
    pub(crate) fn thin(&self) -> bool {
        self.config.thin_provisioning
    }

    pub fn stats(&self) -> LuStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LuStats {
            read_commands: l(&c.read_commands),
            read_bytes: l(&c.read_bytes),
            write_commands: l(&c.write_commands),
            write_bytes: l(&c.write_bytes),
            other_commands: l(&c.other_commands),
            errors: l(&c.errors),
            unit_attentions: l(&c.unit_attentions),
        }
    }

    // ----- nexus and unit attention management -----

    /// A new I_T nexus can see this LU: it gets 29/00 POWER ON, RESET, OR
    /// BUS DEVICE RESET OCCURRED on its first command. A nexus the LU has
    /// never heard of is registered the same way on its first command.
    pub fn nexus_established(&self, nexus: &Nexus) {
        let entry = {
            let mut map = self.nexuses.write().unwrap_or_else(|e| e.into_inner());
            map.entry(nexus.id)
                .or_insert_with(|| Arc::new(NexusEntry::new(nexus)))
                .clone()
        };
        entry.push(sense::POWER_ON_RESET_OCCURRED);
    }

    /// The nexus is gone (session closed, connection lost for good): forget
    /// its unit attentions and drop its RESERVE(6) reservation.
    pub fn nexus_lost(&self, nexus: NexusId) {
        self.nexuses
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&nexus);
        reservation::nexus_lost(self, nexus);
    }

    /// LOGICAL UNIT RESET or TARGET WARM/COLD RESET, issued by `by` (None: by
    /// the target itself). Other nexuses get 29/03 BUS DEVICE RESET FUNCTION
    /// OCCURRED; RESERVE(6) is released; persistent reservations survive
    /// (SPC-4 §5.9.11).
    pub fn reset(&self, by: Option<NexusId>) {
        self.queue_ua_others(by, sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
        reservation::reset(self);
        if let Some(shared) = self.backend.shared_state() {
            shared.announce_reset();
        }
        // Mode parameters return to their defaults only on power on; a reset
        // keeps them (SPC-4 §5.8: shared mode pages retain current values).
    }

    /// The backend's capacity changed (or should change to `new_size_bytes`):
    /// every nexus gets 2A/09 CAPACITY DATA HAS CHANGED. Returns the new
    /// capacity in blocks.
    pub fn resize(&self, new_size_bytes: Option<u64>) -> Result<u64, LuError> {
        let _w = self.write_order.write().unwrap_or_else(|e| e.into_inner());
        let size = self
            .backend
            .set_size(new_size_bytes)
            .map_err(LuError::Resize)?;
        let blocks = size >> self.block_shift;
        if blocks == 0 {
            return Err(LuError::TooSmall {
                size,
                block_size: self.config.block_size,
            });
        }
        let old = self.blocks.swap(blocks, Ordering::AcqRel);
        if old != blocks {
            self.queue_ua_others(None, sense::CAPACITY_DATA_HAS_CHANGED);
        }
        Ok(blocks)
    }

    /// A store resized from outside (an RBD image grown with `rbd resize`
    /// on any host) shows its new size here: every nexus gets 2A/09
    /// CAPACITY DATA HAS CHANGED, the one whose command noticed it too.
    fn notice_size_change(&self) {
        let blocks = self.backend.size_bytes() >> self.block_shift;
        if blocks != 0 && blocks != self.num_blocks() {
            let old = self.blocks.swap(blocks, Ordering::AcqRel);
            if old != blocks {
                self.queue_ua_others(None, sense::CAPACITY_DATA_HAS_CHANGED);
            }
        }
    }

    /// Sets the target port groups (every gateway's, with their states).
    pub fn set_alua(&self, groups: Vec<crate::AluaGroup>) {
        *self.alua.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(groups);
    }

    pub(crate) fn alua(&self) -> Arc<[crate::AluaGroup]> {
        self.alua.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Queues a unit attention for every known nexus except `except`.
    pub(crate) fn queue_ua_others(&self, except: Option<NexusId>, code: SenseCode) {
        let map = self.nexuses.read().unwrap_or_else(|e| e.into_inner());
        for (id, e) in map.iter() {
            if Some(*id) != except {
                e.push(code);
            }
        }
    }

    /// Queues a unit attention for every nexus whose (initiator port,
    /// target port) names satisfy `pred`, except `except`.
    pub(crate) fn queue_ua_where(
        &self,
        except: Option<NexusId>,
        code: SenseCode,
        pred: impl Fn(&str, &str) -> bool,
    ) {
        let map = self.nexuses.read().unwrap_or_else(|e| e.into_inner());
        for (id, e) in map.iter() {
            if Some(*id) != except && pred(&e.initiator, &e.target) {
                e.push(code);
            }
        }
    }

    fn entry_for(&self, nexus: &Nexus) -> Arc<NexusEntry> {
        if let Some(e) = self
            .nexuses
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&nexus.id)
        {
            return e.clone();
        }
        let mut map = self.nexuses.write().unwrap_or_else(|e| e.into_inner());
        map.entry(nexus.id)
            .or_insert_with(|| {
                let e = NexusEntry::new(nexus);
                e.push(sense::POWER_ON_RESET_OCCURRED);
                Arc::new(e)
            })
            .clone()
    }

    /// Clears a pending unit attention of a nexus without reporting it (a
    /// nexus this LU does not know has none).
    pub(crate) fn clear_ua(&self, nexus: NexusId, code: SenseCode) {
        let e = self
            .nexuses
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&nexus)
            .cloned();
        if let Some(e) = e {
            e.clear(code);
        }
    }

    /// Takes the oldest pending unit attention of a nexus (REQUEST SENSE).
    pub(crate) fn take_ua(&self, nexus: &Nexus) -> Option<SenseCode> {
        self.entry_for(nexus).pop()
    }

    // ----- helpers shared by the command families -----

    /// ILLEGAL REQUEST, LBA OUT OF RANGE unless `[lba, lba+n)` fits.
    pub(crate) fn check_range(&self, lba: u64, n: u64) -> Result<(), Fail> {
        match lba.checked_add(n) {
            Some(end) if end <= self.num_blocks() => Ok(()),
            _ => Err(Sense::new(sense::LBA_OUT_OF_RANGE).into()),
        }
    }

    /// DATA PROTECT when the medium is write protected (config or SWP).
    pub(crate) fn check_writable(&self) -> Result<(), Fail> {
        if self.config.read_only {
            return Err(sense::WRITE_PROTECTED.into());
        }
        if self.swp.load(Ordering::Relaxed) {
            return Err(sense::SOFTWARE_WRITE_PROTECTED.into());
        }
        Ok(())
    }

    pub(crate) fn write_protected(&self) -> bool {
        self.config.read_only || self.swp.load(Ordering::Relaxed)
    }

    pub(crate) fn bytes_of(&self, blocks: u64) -> Option<u64> {
        blocks.checked_mul(u64::from(self.config.block_size))
    }

    pub(crate) fn offset_of(&self, lba: u64) -> u64 {
        lba << self.block_shift
    }

    /// Flush to stable storage if the backend caches writes.
    pub(crate) fn flush_backend(&self) -> Result<(), Fail> {
        if self.caps.volatile_cache {
            self.backend.flush().map_err(|e| {
                tracing::warn!(error = %e, "backend flush failed");
                Fail::from(sense::WRITE_ERROR)
            })?;
        }
        Ok(())
    }

    // ----- execution -----

    /// Executes one command to completion.
    pub fn execute(&self, task: &ScsiTask<'_>) -> ScsiResponse {
        let resp = match self.execute_inner(task) {
            Ok(r) => r,
            Err(f) => f.into_response(),
        };
        if resp.status != status::GOOD && resp.status != status::CONDITION_MET {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                opcode = task.cdb.first().copied().unwrap_or(0),
                status = resp.status,
                sense = ?resp.sense_code(),
                "command failed"
            );
        }
        resp
    }

    fn execute_inner(&self, task: &ScsiTask<'_>) -> CmdResult {
        let cdb = Cdb::new(task.cdb)?;
        let opcode = cdb.opcode();
        let entry = self.entry_for(task.nexus);
        self.notice_size_change();
        reservation::refresh_shared(self);
        if !matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) {
            if let Some(ua) = entry.pop() {
                self.counters
                    .unit_attentions
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Sense::new(ua).into());
            }
        }
        if self.res_active.load(Ordering::Acquire) {
            reservation::check_conflict(self, task.nexus, &cdb)?;
        }
        sanitize::gate(self, cdb)?;
        self.dispatch(task, cdb)
    }

    fn dispatch(&self, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
        let r = match cdb.opcode() {
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => return sbc::read(self, cdb),
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                return sbc::write(self, t, cdb)
            }
            op::TEST_UNIT_READY => spc::test_unit_ready(self, cdb),
            op::INQUIRY => vpd::inquiry(self, t, cdb),
            op::REQUEST_SENSE => spc::request_sense(self, t, cdb),
            op::REPORT_LUNS => spc::report_luns(std::iter::once(t.lun), cdb),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => mode::mode_sense(self, cdb),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => mode::mode_select(self, t, cdb),
            op::START_STOP_UNIT => spc::start_stop_unit(self, cdb),
            op::PREVENT_ALLOW => spc::prevent_allow(self, cdb),
            op::READ_CAPACITY_10 => sbc::read_capacity_10(self, cdb),
            op::SERVICE_ACTION_IN_16 => match cdb.service_action() {
                sa::READ_CAPACITY_16 => sbc::read_capacity_16(self, cdb),
                sa::GET_LBA_STATUS => sbc::get_lba_status(self, cdb),
                _ => Err(Sense::invalid_cdb(1, Some(4)).into()),
            },
            op::MAINTENANCE_IN => match cdb.service_action() {
                sa::REPORT_SUPPORTED_OPCODES => opcodes::report_supported_opcodes(self, cdb),
                sa::REPORT_TARGET_PORT_GROUPS => spc::report_target_port_groups(self, t, cdb),
                sa::REPORT_SUPPORTED_TMFS => spc::report_supported_tmfs(cdb),
                _ => Err(Sense::invalid_cdb(1, Some(4)).into()),
            },
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
                sbc::synchronize_cache(self, cdb)
            }
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => sbc::verify(self, t, cdb),
            op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16 => {
                return sbc::write(self, t, cdb)
            }
            op::PRE_FETCH_10 | op::PRE_FETCH_16 => sbc::pre_fetch(self, cdb),
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => sbc::write_same(self, t, cdb),
            op::UNMAP => sbc::unmap(self, t, cdb),
            op::COMPARE_AND_WRITE => sbc::compare_and_write(self, t, cdb),
            op::ORWRITE_16 => sbc::orwrite(self, t, cdb),
            op::WRITE_ATOMIC_16 => return sbc::write(self, t, cdb),
            op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => sbc::read_defect_data(cdb),
            op::SANITIZE => sanitize::sanitize(self, t, cdb),
            op::RESERVE_6 => reservation::reserve6(self, t.nexus, cdb),
            op::RELEASE_6 => reservation::release6(self, t.nexus, cdb),
            op::PERSISTENT_RESERVE_IN => reservation::pr_in(self, t, cdb),
            op::PERSISTENT_RESERVE_OUT => reservation::pr_out(self, t, cdb),
            _ => Err(sense::INVALID_COMMAND_OPERATION_CODE.into()),
        };
        self.counters.other_commands.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// How many bytes of Data-Out this CDB asks for (the SCSI transfer length
    /// of a write-type command), so the port can compute residuals; `None`
    /// for commands that take no data-out.
    pub fn expected_data_out_len(&self, cdb: &[u8]) -> Option<u64> {
        let c = Cdb::new(cdb).ok()?;
        let bs = u64::from(self.config.block_size);
        let n = match c.opcode() {
            op::WRITE_6 => {
                let n = u64::from(c.byte(4));
                (if n == 0 { 256 } else { n }) * bs
            }
            op::WRITE_10 | op::WRITE_VERIFY_10 => u64::from(c.u16(7)) * bs,
            op::WRITE_12 | op::WRITE_VERIFY_12 => u64::from(c.u32(6)) * bs,
            op::WRITE_16 | op::WRITE_VERIFY_16 | op::ORWRITE_16 => u64::from(c.u32(10)) * bs,
            op::WRITE_ATOMIC_16 => u64::from(c.u16(12)) * bs,
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
                let n = match c.opcode() {
                    op::VERIFY_10 => u64::from(c.u16(7)),
                    op::VERIFY_12 => u64::from(c.u32(6)),
                    _ => u64::from(c.u32(10)),
                };
                match (c.byte(1) >> 1) & 3 {
                    0 => return None,
                    3 => bs,
                    _ => n * bs,
                }
            }
            op::COMPARE_AND_WRITE => 2 * u64::from(c.byte(13)) * bs,
            op::WRITE_SAME_10 => bs,
            op::WRITE_SAME_16 => {
                if c.bit(1, 0) {
                    0
                } else {
                    bs
                }
            }
            op::UNMAP => u64::from(c.u16(7)),
            op::MODE_SELECT_6 => u64::from(c.byte(4)),
            op::MODE_SELECT_10 => u64::from(c.u16(7)),
            op::PERSISTENT_RESERVE_OUT => u64::from(c.u32(5)),
            op::SANITIZE => u64::from(c.u16(7)),
            op::EXTENDED_COPY => u64::from(c.u32(10)),
            _ => return None,
        };
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn first_command_of_new_nexus_reports_power_on_ua_once() {
        let lu = mem_lu();
        let n = nexus(1);
        let r = exec(&lu, &n, &[0, 0, 0, 0, 0, 0], &[]);
        assert_check(&r, sense::POWER_ON_RESET_OCCURRED);
        let r = exec(&lu, &n, &[0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(r.status, status::GOOD);
    }

    #[test]
    fn inquiry_does_not_consume_unit_attention() {
        let lu = mem_lu();
        let n = nexus(1);
        let r = exec(&lu, &n, &[0x12, 0, 0, 0, 96, 0], &[]);
        assert_eq!(r.status, status::GOOD);
        let r = exec(&lu, &n, &[0, 0, 0, 0, 0, 0], &[]);
        assert_check(&r, sense::POWER_ON_RESET_OCCURRED);
    }

    #[test]
    fn reset_queues_bus_device_reset_for_other_nexuses_only() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        lu.reset(Some(a.id));
        assert_eq!(exec(&lu, &a, &TUR, &[]).status, status::GOOD);
        assert_check(
            &exec(&lu, &b, &TUR, &[]),
            sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED,
        );
        assert_eq!(exec(&lu, &b, &TUR, &[]).status, status::GOOD);
    }

    #[test]
    fn nexus_established_queues_power_on_again() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        lu.nexus_established(&a);
        assert_check(&exec(&lu, &a, &TUR, &[]), sense::POWER_ON_RESET_OCCURRED);
    }

    #[test]
    fn resize_reports_capacity_changed_to_every_nexus() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        let blocks = lu.resize(Some(2 << 20)).unwrap();
        assert_eq!(blocks, (2 << 20) / 512);
        assert_check(&exec(&lu, &a, &TUR, &[]), sense::CAPACITY_DATA_HAS_CHANGED);
        assert_check(&exec(&lu, &b, &TUR, &[]), sense::CAPACITY_DATA_HAS_CHANGED);
        assert_eq!(lu.num_blocks(), blocks);
    }

    #[test]
    fn new_rejects_bad_block_size_and_tiny_backend() {
        let cfg = LuConfig {
            block_size: 1000,
            ..LuConfig::default()
        };
        assert!(LogicalUnit::new(cfg, Box::new(crate::MemoryBackend::new(1 << 20))).is_err());
        assert!(LogicalUnit::new(
            LuConfig::default(),
            Box::new(crate::MemoryBackend::new(100))
        )
        .is_err());
        let cfg = LuConfig {
            vendor: "TOO LONG VENDOR".into(),
            ..LuConfig::default()
        };
        assert!(LogicalUnit::new(cfg, Box::new(crate::MemoryBackend::new(1 << 20))).is_err());
    }

    #[test]
    fn spawn_io_runs_commands_on_the_lus_own_threads() {
        let path = std::path::Path::new("/var/tmp")
            .join(format!("scsi-target-lu-io-{}", std::process::id()));
        let opts = crate::FileOptions {
            direct: false,
            io_threads: 4,
        };
        let fb = crate::FileBackend::create_with(&path, 1 << 20, opts).unwrap();
        let lu = LogicalUnit::new(LuConfig::default(), Box::new(fb)).unwrap();
        assert!(lu.may_block());
        assert_eq!(lu.io_threads(), 4);
        let (tx, rx) = std::sync::mpsc::channel();
        let lu2 = lu.clone();
        lu.spawn_io(move || {
            let r = exec(&lu2, &nexus(1), &TUR, &[]);
            let name = std::thread::current().name().map(str::to_string);
            tx.send((r.status, name)).unwrap();
        });
        let (st, name) = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(st, status::CHECK_CONDITION, "power-on unit attention");
        assert!(name.unwrap_or_default().starts_with("lu-io-"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn unknown_opcode_is_invalid_command_operation_code() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let before = lu.stats().errors;
        let r = exec(&lu, &a, &[0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_check(&r, sense::INVALID_COMMAND_OPERATION_CODE);
        assert_eq!(lu.stats().errors, before + 1);
    }

    #[test]
    fn short_cdb_is_invalid_field() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let r = exec(&lu, &a, &[0x28, 0, 0, 0, 0, 0], &[]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn expected_data_out_len_follows_the_cdb() {
        let lu = mem_lu();
        assert_eq!(
            lu.expected_data_out_len(&[0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0]),
            Some(1024)
        );
        assert_eq!(
            lu.expected_data_out_len(&[0x0A, 0, 0, 0, 0, 0]),
            Some(256 * 512)
        );
        assert_eq!(
            lu.expected_data_out_len(&[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0]),
            None
        );
    }
}
