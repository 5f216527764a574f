//! The live model built from the configuration: targets, portal groups,
//! initiator credentials, logical units and the views that decide which
//! initiator sees which LU at which LUN.
//!
//! The model is an immutable snapshot behind a lock (`RwLock<Arc<Model>>`):
//! logins and discovery take the current snapshot, an administrative change
//! builds a whole new one and swaps it in, so nothing a session uses
//! changes under it. Logical units are `Arc<LogicalUnit>` carried from one
//! snapshot to the next (their data, unit attentions and reservations
//! stay). Each session's LUN table ([`Luns`]) follows the newest snapshot,
//! so a view added or removed takes effect on the next command.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use scsi_target::{
    AluaGroup, AluaState, Backend, FileBackend, FileOptions, LogicalUnit, LuConfig, LunMap,
    MemoryBackend, NexusId, NullBackend, RbdBackend, RbdConfig, ScsiResponse, ScsiTask,
};
use thiserror::Error;

use crate::config::{
    parse_size, AuthConfig, BackendKind, Config, ConfigError, Defaults, InitiatorConfig, LuDef,
};
use crate::session::SessionTable;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("target {target} LUN {lun}: {what}")]
    Lun {
        target: String,
        lun: u64,
        what: String,
    },
    #[error("LU {guid}: {what}")]
    Lu { guid: String, what: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// One iSCSI target node.
pub struct Target {
    pub iqn: String,
    pub alias: Option<String>,
    pub portal_groups: Vec<u16>,
    /// The auth method in force (the target's own, or the defaults').
    pub auth: AuthConfig,
    /// Empty: every initiator may log in.
    pub allowed_initiators: Vec<String>,
    /// The target's own CHAP credentials, for mutual CHAP.
    pub mutual_chap: Option<(String, Vec<u8>)>,
    /// The LUNs of this target as one initiator (or, in the model's own
    /// copy, every initiator) sees them, following the live views.
    pub luns: Luns,
}

impl Target {
    pub fn admits(&self, initiator: &str) -> bool {
        self.allowed_initiators.is_empty()
            || self
                .allowed_initiators
                .iter()
                .any(|a| a.eq_ignore_ascii_case(initiator))
    }

    /// The same target seen by `initiator`.
    fn for_initiator(&self, live: &Arc<Live>, initiator: &str) -> Target {
        Target {
            iqn: self.iqn.clone(),
            alias: self.alias.clone(),
            portal_groups: self.portal_groups.clone(),
            auth: self.auth,
            allowed_initiators: self.allowed_initiators.clone(),
            mutual_chap: self.mutual_chap.clone(),
            luns: Luns::new(live, Some(initiator), &self.iqn),
        }
    }
}

pub struct PortalGroup {
    pub tag: u16,
    pub portals: Vec<SocketAddr>,
    /// The portals also take iSER connections.
    pub iser: bool,
    /// The portals take TCP connections.
    pub tcp: bool,
}

/// A registered logical unit.
pub struct LuEntry {
    pub def: LuDef,
    /// `[[target.lun]]` shorthand: the target and LUN it stands for.
    pub implicit: Option<(String, u64)>,
    pub lu: Arc<LogicalUnit>,
}

/// One immutable snapshot of everything the target serves.
pub struct Model {
    pub generation: u64,
    /// The document this snapshot was built from (what is on disk).
    pub config: Config,
    pub targets: Vec<Arc<Target>>,
    pub portal_groups: Vec<PortalGroup>,
    pub initiators: HashMap<String, InitiatorConfig>,
    /// By lower-case GUID.
    pub lus: BTreeMap<String, Arc<LuEntry>>,
    pub discovery_auth: AuthConfig,
    pub defaults: Defaults,
}

impl Model {
    pub fn target(&self, iqn: &str) -> Option<&Arc<Target>> {
        self.targets
            .iter()
            .find(|t| t.iqn.eq_ignore_ascii_case(iqn))
    }

    pub fn portal_group(&self, tag: u16) -> Option<&PortalGroup> {
        self.portal_groups.iter().find(|pg| pg.tag == tag)
    }

    pub fn lu(&self, guid: &str) -> Option<&Arc<LuEntry>> {
        self.lus.get(&guid.to_ascii_lowercase())
    }

    /// The LUN table `initiator` (None: views for all hosts only) sees at
    /// `target`.
    pub fn lun_map(&self, initiator: Option<&str>, target: &str) -> LunMap {
        let mut map = LunMap::new();
        for (lun, guid) in self.config.lun_map_for(initiator, target) {
            if let Some(e) = self.lu(&guid) {
                map.insert(lun, e.lu.clone());
            }
        }
        map
    }
}

/// The swappable snapshot, shared by the registry and every session's
/// [`Luns`].
pub struct Live {
    model: RwLock<Arc<Model>>,
    generation: AtomicU64,
}

impl Live {
    fn snapshot(&self) -> Arc<Model> {
        match self.model.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// A session's LUN table: resolved from the newest snapshot, cached until
/// the next change.
pub struct Luns {
    live: Weak<Live>,
    initiator: Option<String>,
    target: String,
    cache: Mutex<(u64, Arc<LunMap>)>,
    /// A session's table as its nexus last used it: when a command finds
    /// a newer one, the nexus is told its inventory changed (None: the
    /// model's own all-hosts table, which no nexus uses).
    acked: Mutex<Option<Arc<LunMap>>>,
}

impl Luns {
    fn new(live: &Arc<Live>, initiator: Option<&str>, target: &str) -> Luns {
        let luns = Luns {
            live: Arc::downgrade(live),
            initiator: initiator.map(String::from),
            target: target.to_string(),
            cache: Mutex::new((u64::MAX, Arc::new(LunMap::new()))),
            acked: Mutex::new(None),
        };
        if initiator.is_some() {
            // The session's nexus starts out with the table of its login.
            let first = luns.map();
            *lock(&luns.acked) = Some(first);
        }
        luns
    }

    /// The current table.
    pub fn map(&self) -> Arc<LunMap> {
        let Some(live) = self.live.upgrade() else {
            return Arc::new(LunMap::new());
        };
        let generation = live.generation.load(Ordering::Acquire);
        let mut cache = match self.cache.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if cache.0 != generation {
            let model = live.snapshot();
            let map = model.lun_map(self.initiator.as_deref(), &self.target);
            *cache = (model.generation, Arc::new(map));
        }
        cache.1.clone()
    }

    pub fn get(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.map().get(lun).cloned()
    }

    pub fn luns(&self) -> Vec<u64> {
        self.map().luns().collect()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    pub fn execute(&self, task: &ScsiTask<'_>) -> ScsiResponse {
        self.execute_in(&self.map(), task)
    }

    /// [`execute`](Self::execute) in `map`, a table [`map`](Self::map) gave
    /// (the caller has it at hand already: one lookup per command).
    pub fn execute_in(&self, map: &Arc<LunMap>, task: &ScsiTask<'_>) -> ScsiResponse {
        {
            let mut acked = lock(&self.acked);
            if let Some(old) = acked.as_ref().filter(|old| !Arc::ptr_eq(old, map)) {
                if map.inventory_changed(old, task.nexus) {
                    tracing::debug!(initiator = %task.nexus.initiator_port_name,
                        target = %self.target, luns = map.len(), "LU inventory changed");
                }
                *acked = Some(map.clone());
            }
        }
        map.execute(task)
    }

    /// The session's nexus is gone: every LU it sees now, and every LU of
    /// the table it last worked with (one a view change took away before
    /// its next command), forgets it.
    pub fn nexus_lost(&self, nexus: NexusId) {
        let now = self.map();
        let before = lock(&self.acked).clone();
        for lu in now.luns().filter_map(|l| now.get(l)) {
            lu.nexus_lost(nexus);
        }
        if let Some(old) = before.filter(|o| !Arc::ptr_eq(o, &now)) {
            for lu in old.luns().filter_map(|l| old.get(l)) {
                if !now
                    .luns()
                    .any(|l| now.get(l).is_some_and(|n| Arc::ptr_eq(n, lu)))
                {
                    lu.nexus_lost(nexus);
                }
            }
        }
    }

    pub fn reset_all(&self, by: Option<NexusId>) {
        self.map().reset_all(by)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Everything a login needs to know, and the session table beside it.
pub struct Registry {
    live: Arc<Live>,
    /// Serialises administrative changes (build, persist, swap).
    change: Mutex<()>,
    pub sessions: SessionTable,
}

impl Registry {
    pub fn build(config: &Config) -> Result<Registry, BuildError> {
        let live = Arc::new(Live {
            model: RwLock::new(Arc::new(empty_model())),
            generation: AtomicU64::new(0),
        });
        let model = build_model(&live, config, None, 1)?;
        if let Ok(mut m) = live.model.write() {
            *m = Arc::new(model);
        }
        live.generation.store(1, Ordering::Release);
        Ok(Registry {
            live,
            change: Mutex::new(()),
            sessions: SessionTable::default(),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Model> {
        self.live.snapshot()
    }

    /// Validates `config`, builds its model (reusing LUs by GUID, resizing
    /// them when their size changed), then calls `commit` with it — where
    /// the daemon binds portals and writes the document — and swaps it in
    /// only if `commit` succeeds. Changes are serialised.
    pub fn apply<E>(
        &self,
        config: &Config,
        commit: impl FnOnce(&Model) -> Result<(), E>,
    ) -> Result<Arc<Model>, ApplyError<E>> {
        let _g = match self.change.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        config.validate().map_err(|e| ApplyError::Build(e.into()))?;
        let old = self.snapshot();
        let generation = old.generation.wrapping_add(1);
        let model =
            build_model(&self.live, config, Some(&old), generation).map_err(ApplyError::Build)?;
        commit(&model).map_err(ApplyError::Commit)?;
        let model = Arc::new(model);
        if let Ok(mut m) = self.live.model.write() {
            *m = model.clone();
        }
        self.live.generation.store(generation, Ordering::Release);
        Ok(model)
    }

    /// The target's shared description (its LUNs: views for all hosts).
    pub fn target(&self, iqn: &str) -> Option<Arc<Target>> {
        self.snapshot().target(iqn).cloned()
    }

    /// The target as `initiator` sees it: its LUN table follows the views
    /// that grant this (initiator, target) pair.
    pub fn target_for(&self, iqn: &str, initiator: &str) -> Option<Arc<Target>> {
        let t = self.target(iqn)?;
        Some(Arc::new(t.for_initiator(&self.live, initiator)))
    }

    pub fn initiator(&self, name: &str) -> Option<InitiatorConfig> {
        self.snapshot()
            .initiators
            .get(&name.to_ascii_lowercase())
            .cloned()
    }

    pub fn defaults(&self) -> Defaults {
        self.snapshot().defaults.clone()
    }

    pub fn discovery_auth(&self) -> AuthConfig {
        self.snapshot().discovery_auth
    }
}

/// Why [`Registry::apply`] refused a change.
#[derive(Debug, Error)]
pub enum ApplyError<E> {
    #[error(transparent)]
    Build(BuildError),
    #[error("{0}")]
    Commit(E),
}

fn empty_model() -> Model {
    Model {
        generation: 0,
        config: Config::from_toml("").unwrap_or_else(|_| Config::embedded_default()),
        targets: vec![],
        portal_groups: vec![],
        initiators: HashMap::new(),
        lus: BTreeMap::new(),
        discovery_auth: AuthConfig::None,
        defaults: Defaults::default(),
    }
}

fn build_model(
    live: &Arc<Live>,
    config: &Config,
    old: Option<&Model>,
    generation: u64,
) -> Result<Model, BuildError> {
    let mut lus = BTreeMap::new();
    for (def, implicit) in config.all_lus() {
        let key = def.guid.to_ascii_lowercase();
        let reused = old
            .and_then(|m| m.lus.get(&key))
            .filter(|e| same_backing(&e.def, &def));
        let lu = match reused {
            Some(e) => {
                resize_if_needed(&e.lu, &def).map_err(|what| lu_error(&def, &implicit, what))?;
                e.lu.clone()
            }
            None => build_lu(&def).map_err(|what| lu_error(&def, &implicit, what))?,
        };
        lu.set_alua(alua_groups(config));
        lus.insert(key, Arc::new(LuEntry { def, implicit, lu }));
    }
    let mut targets = Vec::new();
    for t in &config.targets {
        let mutual_chap = match (&t.chap_user, &t.chap_secret) {
            (Some(u), Some(s)) => Some((u.clone(), s.as_bytes().to_vec())),
            _ => None,
        };
        targets.push(Arc::new(Target {
            iqn: t.iqn.clone(),
            alias: t.alias.clone(),
            portal_groups: t.portal_groups.clone(),
            auth: t.auth.unwrap_or(config.defaults.auth),
            allowed_initiators: t.allowed_initiators.clone(),
            mutual_chap,
            luns: Luns::new(live, None, &t.iqn),
        }));
    }
    let portal_groups = config
        .portal_groups
        .iter()
        .map(|pg| PortalGroup {
            tag: pg.tag,
            portals: pg.portals.iter().filter_map(|p| p.parse().ok()).collect(),
            iser: pg.iser,
            tcp: pg.tcp,
        })
        .collect();
    let initiators = config
        .initiators
        .iter()
        .map(|i| (i.name.to_ascii_lowercase(), i.clone()))
        .collect();
    Ok(Model {
        generation,
        config: config.clone(),
        targets,
        portal_groups,
        initiators,
        lus,
        discovery_auth: config.discovery.auth,
        defaults: config.defaults.clone(),
    })
}

fn lu_error(def: &LuDef, implicit: &Option<(String, u64)>, what: String) -> BuildError {
    match implicit {
        Some((target, lun)) => BuildError::Lun {
            target: target.clone(),
            lun: *lun,
            what,
        },
        None => BuildError::Lu {
            guid: def.guid.clone(),
            what,
        },
    }
}

/// Whether an existing LU can carry on as `new` (same store, same shape).
fn same_backing(old: &LuDef, new: &LuDef) -> bool {
    old.backend == new.backend
        && old.path == new.path
        && old.block_size == new.block_size
        && old.serial == new.serial
        && old.vid == new.vid
        && old.pid == new.pid
        && old.read_only == new.read_only
        && old.thin == new.thin
        && old.write_cache == new.write_cache
        && (old.pool.as_deref(), old.image.as_deref())
            == (new.pool.as_deref(), new.image.as_deref())
        && (old.ceph_conf.as_deref(), old.ceph_id.as_deref())
            == (new.ceph_conf.as_deref(), new.ceph_id.as_deref())
}

fn resize_if_needed(lu: &LogicalUnit, def: &LuDef) -> Result<(), String> {
    let Some(want) = def.size.as_deref().and_then(parse_size) else {
        return Ok(());
    };
    let have = lu.num_blocks().saturating_mul(u64::from(lu.block_size()));
    if want != have {
        lu.resize(Some(want)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The configured ALUA groups (validated, so every state parses).
fn alua_groups(config: &Config) -> Vec<AluaGroup> {
    config
        .alua_groups
        .iter()
        .filter_map(|g| {
            Some(AluaGroup {
                id: g.id,
                state: AluaState::parse(&g.state)?,
                relative_ports: g.portal_groups.clone(),
            })
        })
        .collect()
}

/// Opens the LU's RBD image (blocking, bounded by the cluster timeouts).
fn open_rbd(def: &LuDef) -> Result<RbdBackend, String> {
    let (Some(pool), Some(image)) = (def.pool.as_deref(), def.image.as_deref()) else {
        return Err("backend \"rbd\" needs pool and image".to_string());
    };
    let cfg = RbdConfig {
        conf: def.ceph_conf.clone(),
        client_id: def.ceph_id.clone().unwrap_or_else(|| "admin".to_string()),
        ..RbdConfig::new(pool, image)
    };
    RbdBackend::open(&cfg).map_err(|e| format!("rbd:{pool}/{image}: {e}"))
}

fn build_lu(def: &LuDef) -> Result<Arc<LogicalUnit>, String> {
    let size = def.size.as_deref().and_then(parse_size);
    let backend: Box<dyn Backend> = match def.backend {
        BackendKind::Memory => Box::new(MemoryBackend::new(size.unwrap_or(0))),
        BackendKind::Null => Box::new(NullBackend::new(size.unwrap_or(0))),
        BackendKind::File => {
            let path = def.path.as_deref().ok_or("backend \"file\" needs path")?;
            let exists = std::path::Path::new(path).exists();
            let opts = FileOptions {
                direct: def.direct,
                io_threads: def.io_threads.unwrap_or(0),
            };
            let b = match (exists, size) {
                (false, Some(n)) => FileBackend::create_with(path, n, opts),
                _ => FileBackend::open_with(path, def.read_only, opts),
            };
            Box::new(b.map_err(|e| format!("{path}: {e}"))?)
        }
        BackendKind::Rbd => Box::new(open_rbd(def)?),
    };
    let id = u64::from_str_radix(&def.guid, 16).map_err(|_| "bad guid".to_string())?;
    let config = LuConfig {
        block_size: def.block_size,
        vendor: def.vid.clone().unwrap_or_else(|| "IRONSTAR".to_string()),
        product: def.pid.clone().unwrap_or_else(|| {
            match def.backend {
                BackendKind::Memory => "MEMORY LU",
                BackendKind::File => "FILE LU",
                BackendKind::Null => "NULL LU",
                BackendKind::Rbd => "RBD LU",
            }
            .to_string()
        }),
        revision: "0001".to_string(),
        serial: def
            .serial
            .clone()
            .unwrap_or_else(|| def.guid.to_ascii_lowercase()),
        naa_id: id,
        write_cache: def.write_cache.unwrap_or(true),
        read_only: def.read_only,
        thin_provisioning: def.thin.unwrap_or(matches!(
            def.backend,
            BackendKind::Memory | BackendKind::File | BackendKind::Rbd
        )),
    };
    let lu = LogicalUnit::new(config, backend).map_err(|e| e.to_string())?;
    // A file given a size it does not have yet grows (or shrinks) to it.
    resize_if_needed(&lu, def)?;
    Ok(lu)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "iqn.2026-11.dev.ironstar:t0";
    const T1: &str = "iqn.2026-11.dev.ironstar:t1";
    const A: &str = "iqn.1994-05.com.example:a";
    const B: &str = "iqn.1994-05.com.example:b";

    fn config() -> Config {
        Config::from_toml(&format!(
            r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:0"]
[[target]]
iqn = "{T0}"
[[target.lun]]
lun = 0
backend = "memory"
size = "1MiB"
[[target]]
iqn = "{T1}"
[[lu]]
guid = "6000000000000001"
backend = "memory"
size = "2MiB"
[[lu]]
guid = "6000000000000002"
backend = "memory"
size = "4MiB"
[[host_group]]
name = "hga"
members = ["{A}"]
[[target_group]]
name = "tg1"
members = ["{T1}"]
[[view]]
lu = "6000000000000001"
host_group = "hga"
target_group = "tg1"
lun = 3
[[view]]
lu = "6000000000000002"
target_group = "tg1"
lun = 5
"#
        ))
        .unwrap()
    }

    #[test]
    fn views_decide_which_initiator_sees_which_lun() {
        let r = Registry::build(&config()).unwrap();
        let a = r.target_for(T1, A).unwrap();
        let b = r.target_for(T1, B).unwrap();
        assert_eq!(a.luns.luns(), vec![3, 5]);
        assert_eq!(b.luns.luns(), vec![5]);
        // The shorthand LUN 0 of t0 is for everyone, and only at t0.
        assert_eq!(r.target_for(T0, B).unwrap().luns.luns(), vec![0]);
    }

    #[test]
    fn a_change_reaches_existing_sessions_and_keeps_lus() {
        let r = Registry::build(&config()).unwrap();
        let b = r.target_for(T1, B).unwrap();
        let lu5 = b.luns.get(5).unwrap();
        let mut c = r.snapshot().config.clone();
        c.host_groups[0].members.push(B.to_string());
        c.lus[1].size = Some("8MiB".into());
        r.apply(&c, |_| Ok::<(), String>(())).unwrap();
        assert_eq!(b.luns.luns(), vec![3, 5]);
        let again = b.luns.get(5).unwrap();
        assert!(Arc::ptr_eq(&lu5, &again), "the LU object is carried over");
        assert_eq!(again.num_blocks(), 8 * 2048);
    }

    #[test]
    fn a_failed_commit_changes_nothing() {
        let r = Registry::build(&config()).unwrap();
        let mut c = r.snapshot().config.clone();
        c.views.clear();
        let Err(err) = r.apply(&c, |_| Err("disk full")) else {
            panic!("applied")
        };
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(r.snapshot().config.views.len(), 2);
        assert_eq!(r.target_for(T1, A).unwrap().luns.luns(), vec![3, 5]);
    }

    #[test]
    fn an_invalid_change_is_refused_with_its_reason() {
        let r = Registry::build(&config()).unwrap();
        let mut c = r.snapshot().config.clone();
        c.views[1].lun = 3;
        let Err(err) = r.apply(&c, |_| Ok::<(), String>(())) else {
            panic!("applied")
        };
        assert!(err.to_string().contains("already uses LUN 3"), "{err}");
    }

    fn nexus(initiator: &str, target: &str) -> scsi_target::Nexus {
        scsi_target::Nexus {
            id: 42,
            initiator_port_name: Arc::from(format!("{initiator},i,0x400000000001")),
            target_port_name: Arc::from(format!("{target},t,0x0001")),
            relative_target_port_id: 1,
            target_port_group_id: 1,
        }
    }

    /// TEST UNIT READY on `lun`: None for GOOD, else the sense (key, ASC, ASCQ).
    fn tur(t: &Target, n: &scsi_target::Nexus, lun: u64) -> Option<(u8, u8, u8)> {
        let r = t.luns.execute(&ScsiTask {
            nexus: n,
            lun,
            cdb: &[0; 6],
            data_out: &[],
            data_out_buffer: None,
            expected_in_len: 0,
            attr: scsi_target::TaskAttr::Simple,
            tag: 1,
        });
        r.sense_code().map(|s| (s.key, s.asc, s.ascq))
    }

    #[test]
    fn a_view_change_tells_the_nexus_and_releases_what_it_lost() {
        let r = Registry::build(&config()).unwrap();
        let a = r.target_for(T1, A).unwrap();
        let b = r.target_for(T1, B).unwrap();
        let (na, mut nb) = (nexus(A, T1), nexus(B, T1));
        nb.id = 43;
        // First commands: the power-on UA, then GOOD.
        assert_eq!(tur(&a, &na, 3), Some((6, 0x29, 0)));
        assert_eq!(tur(&a, &na, 5), Some((6, 0x29, 0)));
        assert_eq!(tur(&a, &na, 5), None);
        assert_eq!(tur(&b, &nb, 5), Some((6, 0x29, 0)));
        assert_eq!(tur(&b, &nb, 5), None);
        // LU 1 (A's LUN 3) leaves A's view: A's inventory changes, B's does not.
        let mut c = r.snapshot().config.clone();
        c.views.remove(0);
        r.apply(&c, |_| Ok::<(), String>(())).unwrap();
        assert_eq!(tur(&a, &na, 5), Some((6, 0x3F, 0x0E)));
        assert_eq!(tur(&a, &na, 5), None, "reported once");
        assert_eq!(tur(&a, &na, 3), Some((5, 0x25, 0)), "no longer reachable");
        assert_eq!(tur(&b, &nb, 5), None, "B's inventory did not change");
        // The view comes back: LU 1 had forgotten A's nexus, so it greets
        // it as a new one (29/00), and LUN 5 reports the change again.
        let mut c = r.snapshot().config.clone();
        c.views.insert(0, config().views[0].clone());
        r.apply(&c, |_| Ok::<(), String>(())).unwrap();
        assert_eq!(tur(&a, &na, 3), Some((6, 0x29, 0)));
        assert_eq!(tur(&a, &na, 5), Some((6, 0x3F, 0x0E)));
        // A resize alone is no inventory change.
        let mut c = r.snapshot().config.clone();
        c.lus[1].size = Some("8MiB".into());
        r.apply(&c, |_| Ok::<(), String>(())).unwrap();
        assert_eq!(tur(&b, &nb, 5), Some((6, 0x2A, 0x09)));
        assert_eq!(tur(&b, &nb, 5), None);
    }

    #[test]
    fn a_lost_nexus_is_forgotten_by_lus_a_view_change_took_away_too() {
        let r = Registry::build(&config()).unwrap();
        let a = r.target_for(T1, A).unwrap();
        let na = nexus(A, T1);
        assert_eq!(tur(&a, &na, 3), Some((6, 0x29, 0)));
        assert_eq!(tur(&a, &na, 3), None);
        let lu1 = a.luns.get(3).unwrap();
        // LUN 3 leaves A's view; A sends nothing more and logs out.
        let mut c = r.snapshot().config.clone();
        let view = c.views.remove(0);
        r.apply(&c, |_| Ok::<(), String>(())).unwrap();
        a.luns.nexus_lost(na.id);
        // The view comes back: had LU 1 kept the nexus, its next command
        // would be GOOD; forgotten, it is greeted as a new nexus.
        c.views.insert(0, view);
        r.apply(&c, |_| Ok::<(), String>(())).unwrap();
        let again = r.target_for(T1, A).unwrap();
        assert!(Arc::ptr_eq(&again.luns.get(3).unwrap(), &lu1));
        assert_eq!(tur(&again, &na, 3), Some((6, 0x29, 0)));
    }

    #[test]
    fn offline_lus_leave_every_view() {
        let r = Registry::build(&config()).unwrap();
        let mut c = r.snapshot().config.clone();
        c.lus[1].online = false;
        r.apply(&c, |_| Ok::<(), String>(())).unwrap();
        assert_eq!(r.target_for(T1, A).unwrap().luns.luns(), vec![3]);
    }
}
