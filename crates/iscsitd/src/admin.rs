//! The administrative verbs behind the JSON-RPC methods: itadm's (targets,
//! TPGs, initiators, defaults, sessions), stmfadm's (LUs, host and target
//! groups, views) and the live inspection.
//!
//! Every change follows one path ([`Admin::change`]): copy the current
//! document, edit the copy, validate it, bind any new portal, write the
//! document atomically, swap the registry's snapshot, and only then stop
//! portals that went away. A change that fails at any step leaves the old
//! document, the old snapshot and the old portals.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use iscsi_target::config::{
    guid_from_id, is_guid, is_iscsi_name, parse_size, AuthConfig, BackendKind, Config, GroupConfig,
    InitiatorConfig, LuDef, PortalGroupConfig, TargetConfig, ViewConfig, MAX_IO_THREADS, MAX_LUN,
};
use iscsi_target::portal::Portal;
use iscsi_target::registry::{ApplyError, LuEntry, Model};
use iscsi_target::session::Session;
use iscsi_target::Registry;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::rpc::{RpcError, METHOD_NOT_FOUND};

type Portals = HashMap<(SocketAddr, u16), JoinHandle<()>>;

pub struct Admin {
    pub registry: Arc<Registry>,
    config_path: PathBuf,
    /// Running portals; the lock also serialises changes.
    portals: Mutex<Portals>,
    /// The Prometheus endpoint, when `[metrics] listen` is set.
    metrics_http: crate::metrics_http::Listener,
    /// The iSNS client's word on each server (set once it runs).
    isns_status: std::sync::OnceLock<crate::isns::Status>,
}

type R = Result<Value, RpcError>;

impl Admin {
    /// Binds the configuration's portals and starts serving them.
    pub async fn start(registry: Arc<Registry>, config_path: PathBuf) -> anyhow::Result<Admin> {
        let admin = Admin {
            registry,
            config_path,
            portals: Mutex::new(HashMap::new()),
            metrics_http: Default::default(),
            isns_status: std::sync::OnceLock::new(),
        };
        let want = admin
            .registry
            .snapshot()
            .config
            .metrics
            .addr()
            .map_err(anyhow::Error::msg)?;
        match admin.metrics_http.prepare(want).await {
            Ok(l) => admin.metrics_http.apply(want, l, admin.registry.clone()),
            // The target serves without its metrics rather than not at all.
            Err(e) => tracing::warn!(error = %e, "metrics listener not started"),
        }
        {
            let mut running = admin.portals.lock().await;
            let bound = bind_missing(&admin.registry.snapshot().config, &running)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            for p in bound {
                tracing::info!(portal = %p.addr, tpgt = p.portal_group_tag, "listening");
                let key = (p.addr, p.portal_group_tag);
                running.insert(key, tokio::spawn(p.run(admin.registry.clone())));
            }
        }
        Ok(admin)
    }

    pub async fn portal_addrs(&self) -> Vec<SocketAddr> {
        self.portals.lock().await.keys().map(|k| k.0).collect()
    }

    pub async fn stop_portals(&self) {
        self.metrics_http.stop();
        for (_, t) in self.portals.lock().await.drain() {
            t.abort();
        }
    }

    /// Applies an edit of the configuration document (see the module doc).
    async fn change(&self, edit: impl FnOnce(&mut Config) -> R) -> R {
        let mut running = self.portals.lock().await;
        let mut cfg = self.registry.snapshot().config.clone();
        let out = edit(&mut cfg)?;
        cfg.validate()
            .map_err(|e| RpcError::refused(e.to_string()))?;
        let bound = bind_missing(&cfg, &running).await?;
        let path = self.config_path.clone();
        let applied = self
            .registry
            .apply(&cfg, |_: &Model| crate::store::save(&path, &cfg));
        match applied {
            Err(ApplyError::Build(e)) => return Err(RpcError::refused(e.to_string())),
            Err(ApplyError::Commit(e)) => return Err(RpcError::refused(e)),
            Ok(_) => {}
        }
        crate::inspect::prune(&self.registry);
        let wanted = wanted_portals(&cfg);
        running.retain(|key, task| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(portal = %key.0, tpgt = key.1, "portal closed");
                task.abort();
            }
            keep
        });
        for p in bound {
            tracing::info!(portal = %p.addr, tpgt = p.portal_group_tag, "listening");
            let key = (p.addr, p.portal_group_tag);
            running.insert(key, tokio::spawn(p.run(self.registry.clone())));
        }
        Ok(out)
    }

    pub async fn call(&self, method: &str, p: &Value) -> R {
        let p = Params(p);
        match method {
            // ----- itadm -----
            "create-target" => self.create_target(p).await,
            "modify-target" => self.modify_target(p).await,
            "delete-target" => self.delete_target(p).await,
            "list-target" => self
                .list_target(p)
                .map(|v| crate::inspect::with_target_io(&self.registry, v)),
            "create-tpg" => self.create_tpg(p).await,
            "delete-tpg" => self.delete_tpg(p).await,
            "list-tpg" => self.list_tpg(p),
            "create-initiator" => self.create_initiator(p).await,
            "modify-initiator" => self.modify_initiator(p).await,
            "delete-initiator" => self.delete_initiator(p).await,
            "list-initiator" => self.list_initiator(p),
            "modify-defaults" => self.modify_defaults(p).await,
            "list-defaults" => self.list_defaults(),
            "list-session" => self.list_session(p),
            "inspect" => {
                let only = p.opt_str("target")?;
                crate::inspect::inspect(&self.registry, only.as_deref()).map_err(RpcError::refused)
            }
            "metrics" => Ok(crate::inspect::metrics(&self.registry)),
            // ----- stmfadm -----
            "create-lu" => self.create_lu(p).await,
            "modify-lu" => self.modify_lu(p).await,
            "delete-lu" => self.delete_lu(p).await,
            "list-lu" => self
                .list_lu(p)
                .map(|v| crate::inspect::with_lu_io(&self.registry, v)),
            "import-lu" => self.import_lu(p).await,
            "online-target" => self.set_target_online(p, true).await,
            "offline-target" => self.set_target_online(p, false).await,
            "online-lu" => self.set_lu_online(p, true).await,
            "offline-lu" => self.set_lu_online(p, false).await,
            "create-hg" => self.create_group(p, Kind::Host).await,
            "delete-hg" => self.delete_group(p, Kind::Host).await,
            "add-hg-member" => self.group_members(p, Kind::Host, true).await,
            "remove-hg-member" => self.group_members(p, Kind::Host, false).await,
            "list-hg" => self.list_group(p, Kind::Host),
            "create-tg" => self.create_group(p, Kind::Target).await,
            "delete-tg" => self.delete_group(p, Kind::Target).await,
            "add-tg-member" => self.group_members(p, Kind::Target, true).await,
            "remove-tg-member" => self.group_members(p, Kind::Target, false).await,
            "list-tg" => self.list_group(p, Kind::Target),
            "add-view" => self.add_view(p).await,
            "remove-view" => self.remove_view(p).await,
            "list-view" => self.list_view(p),
            "list-state" => Ok(
                json!({"operational_status": "online", "config_status": "initialized",
                "config_path": self.config_path.display().to_string()}),
            ),
            "get-config" => serde_json::to_value(&self.registry.snapshot().config)
                .map_err(|e| RpcError::refused(e.to_string())),
            _ => Err(RpcError {
                code: METHOD_NOT_FOUND,
                message: format!("unknown method {method:?}"),
            }),
        }
    }

    // ----- targets -----

    async fn create_target(&self, p: Params<'_>) -> R {
        let name = match p.opt_str("name")? {
            Some(n) => n,
            None => format!("iqn.2026-11.dev.ironstar:{}", random_hex(12)),
        };
        let tpgs = p.opt_tags("tpgs")?;
        let auth = p.opt_auth("auth")?;
        let alias = p.opt_str("alias")?;
        let secret = p.opt_str("chap_secret")?;
        let user = p.opt_str("chap_user")?;
        check_name(&name)?;
        self.change(|c| {
            if c.targets.iter().any(|t| t.iqn.eq_ignore_ascii_case(&name)) {
                return Err(RpcError::refused(format!("target {name} already exists")));
            }
            let portal_groups = match tpgs {
                Some(t) => t,
                None if c.portal_groups.is_empty() => {
                    return Err(RpcError::refused(
                        "no TPG exists: create one first (itadm create-tpg TAG IP[:port])",
                    ))
                }
                None => c.portal_groups.iter().map(|g| g.tag).collect(),
            };
            let chap_user = secret
                .as_ref()
                .map(|_| user.clone().unwrap_or(name.clone()));
            c.targets.push(TargetConfig {
                iqn: name.clone(),
                alias,
                portal_groups,
                auth: auth.flatten(),
                allowed_initiators: vec![],
                chap_user,
                chap_secret: secret,
                luns: vec![],
                online: true,
            });
            Ok(json!({"target": name}))
        })
        .await
    }

    async fn modify_target(&self, p: Params<'_>) -> R {
        let name = p.str("name")?;
        let tpgs = p.opt_tags("tpgs")?;
        let auth = p.opt_auth("auth")?;
        let alias = p.opt_str("alias")?;
        let secret = p.opt_str("chap_secret")?;
        let user = p.opt_str("chap_user")?;
        self.change(|c| {
            let t = c
                .targets
                .iter_mut()
                .find(|t| t.iqn.eq_ignore_ascii_case(&name))
                .ok_or_else(|| RpcError::refused(format!("no target {name}")))?;
            if let Some(tpgs) = tpgs {
                t.portal_groups = tpgs;
            }
            if let Some(a) = auth {
                t.auth = a;
            }
            if let Some(a) = alias {
                t.alias = (!a.is_empty()).then_some(a);
            }
            match secret.as_deref() {
                Some("") => {
                    t.chap_secret = None;
                    t.chap_user = None;
                }
                Some(s) => {
                    t.chap_secret = Some(s.to_string());
                    t.chap_user = Some(user.clone().unwrap_or_else(|| t.iqn.clone()));
                }
                None => {
                    if let (Some(u), Some(_)) = (&user, &t.chap_secret) {
                        t.chap_user = Some(u.clone());
                    }
                }
            }
            Ok(json!({"target": t.iqn}))
        })
        .await
    }

    async fn delete_target(&self, p: Params<'_>) -> R {
        let name = p.str("name")?;
        let force = p.opt_bool("force")?.unwrap_or(false);
        let sessions = self.sessions_of(&name);
        if !sessions.is_empty() && !force {
            return Err(RpcError::refused(format!(
                "target {name} has {} session(s); log them out first or force (-f)",
                sessions.len()
            )));
        }
        self.change(|c| {
            remove_or_refuse(
                &mut c.targets,
                |t| t.iqn.eq_ignore_ascii_case(&name),
                format!("no target {name}"),
            )?;
            Ok(Value::Null)
        })
        .await?;
        let n = self.log_out(sessions).await;
        Ok(json!({"target": name, "sessions_logged_out": n}))
    }

    /// stmfadm online-target / offline-target. Offline: the target's
    /// sessions are asked to log out (then closed) and logins are refused
    /// until it is online again; the state is kept in the configuration.
    async fn set_target_online(&self, p: Params<'_>, online: bool) -> R {
        let name = p.str("name")?;
        let iqn = self
            .change(|c| {
                let t = c
                    .targets
                    .iter_mut()
                    .find(|t| t.iqn.eq_ignore_ascii_case(&name))
                    .ok_or_else(|| RpcError::refused(format!("no target {name}")))?;
                if t.online == online {
                    return Err(RpcError::refused(format!(
                        "target {} is already {}",
                        t.iqn,
                        if online { "online" } else { "offline" }
                    )));
                }
                t.online = online;
                Ok(json!(t.iqn))
            })
            .await?;
        let n = if online {
            0
        } else {
            self.log_out(self.sessions_of(&name)).await
        };
        Ok(json!({"target": iqn, "online": online, "sessions_logged_out": n}))
    }

    fn sessions_of(&self, target: &str) -> Vec<Arc<Session>> {
        self.registry
            .sessions
            .all()
            .into_iter()
            .filter(|s| serves(s, target))
            .collect()
    }

    /// Asks the sessions to log out (Async Message), waits a little, then
    /// closes whoever is still there.
    async fn log_out(&self, sessions: Vec<Arc<Session>>) -> usize {
        let n = sessions.len();
        for s in &sessions {
            s.request_logout();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let live: Vec<u16> = self
                .registry
                .sessions
                .all()
                .iter()
                .map(|s| s.tsih)
                .collect();
            if !sessions.iter().any(|s| live.contains(&s.tsih))
                || tokio::time::Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for s in &sessions {
            s.close_all();
        }
        n
    }

    fn list_target(&self, p: Params<'_>) -> R {
        let only = p.opt_str("name")?;
        let m = self.registry.snapshot();
        let sessions = self.registry.sessions.all();
        let mut out = Vec::new();
        for t in &m.config.targets {
            if only
                .as_deref()
                .is_some_and(|o| !o.eq_ignore_ascii_case(&t.iqn))
            {
                continue;
            }
            let ss: Vec<&Arc<Session>> = sessions.iter().filter(|s| serves(s, &t.iqn)).collect();
            let luns = m.lun_map(None, &t.iqn);
            out.push(json!({
                "name": t.iqn,
                "alias": t.alias,
                "operational_status": "online",
                "sessions": ss.len(),
                "initiators": ss.iter().map(|s| s.initiator_name.clone()).collect::<Vec<_>>(),
                "auth": auth_name(t.auth.unwrap_or(m.config.defaults.auth)),
                "auth_configured": t.auth.map(auth_name).unwrap_or("default"),
                "chap_user": t.chap_user,
                "chap_secret_set": t.chap_secret.is_some(),
                "tpgs": t.portal_groups,
                "allowed_initiators": t.allowed_initiators,
                "luns_for_all_hosts": luns.luns().collect::<Vec<_>>(),
            }));
        }
        listed(out, only, "target")
    }

    // ----- target portal groups -----

    async fn create_tpg(&self, p: Params<'_>) -> R {
        let tag = p.tag("tag")?;
        let iser = p.opt_bool("iser")?.unwrap_or(false);
        let tcp = p.opt_bool("tcp")?.unwrap_or(true);
        let portals = p.str_list("portals")?;
        if portals.is_empty() {
            return Err(RpcError::params("a TPG needs at least one IP[:port]"));
        }
        let portals = portals
            .iter()
            .map(|s| parse_portal(s))
            .collect::<Result<Vec<_>, _>>()?;
        self.change(|c| {
            if c.portal_groups.iter().any(|g| g.tag == tag) {
                return Err(RpcError::refused(format!("TPG {tag} already exists")));
            }
            for g in &c.portal_groups {
                for a in &portals {
                    if g.portals.contains(a) {
                        return Err(RpcError::refused(format!(
                            "portal {a} already belongs to TPG {}",
                            g.tag
                        )));
                    }
                }
            }
            c.portal_groups.push(PortalGroupConfig {
                tag,
                portals: portals.clone(),
                iser,
                tcp,
            });
            Ok(json!({"tag": tag, "portals": portals, "iser": iser, "tcp": tcp}))
        })
        .await
    }

    async fn delete_tpg(&self, p: Params<'_>) -> R {
        let tag = p.tag("tag")?;
        self.change(|c| {
            let users: Vec<&str> = c
                .targets
                .iter()
                .filter(|t| t.portal_groups.contains(&tag))
                .map(|t| t.iqn.as_str())
                .collect();
            if !users.is_empty() {
                return Err(RpcError::refused(format!(
                    "TPG {tag} is used by target(s) {}: modify-target -t first",
                    users.join(", ")
                )));
            }
            remove_or_refuse(
                &mut c.portal_groups,
                |g| g.tag == tag,
                format!("no TPG {tag}"),
            )?;
            Ok(json!({"tag": tag}))
        })
        .await
    }

    fn list_tpg(&self, p: Params<'_>) -> R {
        let only = p.opt_tag("tag")?;
        let m = self.registry.snapshot();
        let out: Vec<Value> = m
            .config
            .portal_groups
            .iter()
            .filter(|g| only.is_none_or(|t| t == g.tag))
            .map(|g| {
                json!({"tag": g.tag, "portals": g.portals, "portal_count": g.portals.len(), "iser": g.iser, "tcp": g.tcp,
                "targets": m.config.targets.iter().filter(|t| t.portal_groups.contains(&g.tag)).map(|t| t.iqn.clone()).collect::<Vec<_>>()})
            })
            .collect();
        listed(out, only, "TPG")
    }

    // ----- initiators -----

    async fn create_initiator(&self, p: Params<'_>) -> R {
        let name = p.str("name")?;
        check_name(&name)?;
        let secret = p
            .opt_str("chap_secret")?
            .ok_or_else(|| RpcError::params("create-initiator needs a CHAP secret (-s)"))?;
        let user = p.opt_str("chap_user")?.unwrap_or_else(|| name.clone());
        self.change(|c| {
            if c.initiators
                .iter()
                .any(|i| i.name.eq_ignore_ascii_case(&name))
            {
                return Err(RpcError::refused(format!(
                    "initiator {name} already exists"
                )));
            }
            c.initiators.push(InitiatorConfig {
                name: name.clone(),
                chap_user: user,
                chap_secret: secret,
            });
            Ok(json!({"initiator": name}))
        })
        .await
    }

    async fn modify_initiator(&self, p: Params<'_>) -> R {
        let name = p.str("name")?;
        let secret = p.opt_str("chap_secret")?;
        let user = p.opt_str("chap_user")?;
        self.change(|c| {
            let i = c
                .initiators
                .iter_mut()
                .find(|i| i.name.eq_ignore_ascii_case(&name))
                .ok_or_else(|| RpcError::refused(format!("no initiator {name}")))?;
            if let Some(s) = secret {
                i.chap_secret = s;
            }
            if let Some(u) = user {
                i.chap_user = u;
            }
            Ok(json!({"initiator": name}))
        })
        .await
    }

    async fn delete_initiator(&self, p: Params<'_>) -> R {
        let name = p.str("name")?;
        self.change(|c| {
            remove_or_refuse(
                &mut c.initiators,
                |i| i.name.eq_ignore_ascii_case(&name),
                format!("no initiator {name}"),
            )?;
            Ok(json!({"initiator": name}))
        })
        .await
    }

    fn list_initiator(&self, p: Params<'_>) -> R {
        let only = p.opt_str("name")?;
        let m = self.registry.snapshot();
        let out: Vec<Value> = m
            .config
            .initiators
            .iter()
            .filter(|i| {
                only.as_deref()
                    .is_none_or(|o| o.eq_ignore_ascii_case(&i.name))
            })
            .map(|i| json!({"name": i.name, "chap_user": i.chap_user, "chap_secret_set": true}))
            .collect();
        listed(out, only, "initiator")
    }

    // ----- defaults -----

    async fn modify_defaults(&self, p: Params<'_>) -> R {
        let auth = p.opt_auth("auth")?;
        let algs = p.opt_str_list("chap_algorithms")?;
        let isns = p.opt_bool("isns")?;
        let servers = p.opt_str_list("isns_servers")?;
        // "" or "off": no metrics endpoint.
        let metrics = p
            .opt_str("metrics_listen")?
            .map(|l| iscsi_target::config::MetricsConfig {
                listen: (!l.is_empty() && l != "off").then_some(l),
            });
        let metrics_bound = match &metrics {
            Some(m) => {
                let want = m.addr().map_err(RpcError::params)?;
                Some((
                    want,
                    self.metrics_http
                        .prepare(want)
                        .await
                        .map_err(RpcError::refused)?,
                ))
            }
            None => None,
        };
        self.change(|c| {
            if let Some(m) = metrics {
                c.metrics = m;
            }
            if let Some(a) = auth {
                c.defaults.auth = a.unwrap_or(AuthConfig::None);
            }
            if let Some(a) = algs {
                c.defaults.chap_algorithms = a.iter().map(|s| s.to_ascii_lowercase()).collect();
            }
            if let Some(i) = isns {
                c.defaults.isns = i;
            }
            if let Some(s) = servers {
                c.defaults.isns_servers = s;
            }
            Ok(Value::Null)
        })
        .await?;
        if let Some((want, bound)) = metrics_bound {
            self.metrics_http.apply(want, bound, self.registry.clone());
        }
        self.list_defaults()
    }

    /// Lets list-defaults show where each iSNS server stands.
    pub fn set_isns_status(&self, status: crate::isns::Status) {
        let _ = self.isns_status.set(status);
    }

    fn list_defaults(&self) -> R {
        let mut v = serde_json::to_value(&self.registry.snapshot().config.defaults)
            .map_err(|e| RpcError::refused(e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "discovery_auth".into(),
                json!(auth_name(self.registry.discovery_auth())),
            );
            o.insert(
                "metrics_listen".into(),
                json!(self.registry.snapshot().config.metrics.listen),
            );
            let isns = self
                .isns_status
                .get()
                .map(|s| match s.lock() {
                    Ok(m) => m.clone(),
                    Err(p) => p.into_inner().clone(),
                })
                .unwrap_or_default();
            o.insert("isns_status".into(), json!(isns));
        }
        Ok(v)
    }

    // ----- sessions and inspection -----

    fn list_session(&self, p: Params<'_>) -> R {
        let only = p.opt_str("target")?;
        let mut sessions = self.registry.sessions.all();
        sessions.sort_by_key(|s| s.tsih);
        Ok(Value::Array(
            sessions
                .iter()
                .filter(|s| only.as_deref().is_none_or(|o| serves(s, o)))
                .map(session_json)
                .collect(),
        ))
    }

    // ----- logical units -----

    async fn create_lu(&self, p: Params<'_>) -> R {
        let path = p.str("path")?;
        let size = p.opt_str("size")?;
        let props = p.props()?;
        let rbd = path.strip_prefix("rbd:").map(|spec| spec.split_once('/'));
        let backend = match path.as_str() {
            "memory" => BackendKind::Memory,
            "null" => BackendKind::Null,
            _ if rbd.is_some() => BackendKind::Rbd,
            _ => BackendKind::File,
        };
        let mut def = LuDef {
            guid: String::new(),
            alias: None,
            backend,
            size: None,
            path: (backend == BackendKind::File).then(|| path.clone()),
            block_size: 512,
            serial: None,
            vid: None,
            pid: None,
            write_cache: None,
            read_only: false,
            thin: None,
            direct: false,
            io_threads: None,
            online: true,
            pool: None,
            image: None,
            ceph_conf: None,
            ceph_id: None,
        };
        if let Some(spec) = rbd {
            let (pool, image) = spec
                .filter(|(p, i)| !p.is_empty() && !i.is_empty())
                .ok_or_else(|| RpcError::params("an RBD LU is rbd:POOL/IMAGE"))?;
            (def.pool, def.image) = (Some(pool.to_string()), Some(image.to_string()));
        }
        if let Some(s) = size {
            let n = parse_size(&s).ok_or_else(|| {
                RpcError::params(format!("size {s:?} is not a size (e.g. 10G, 512M)"))
            })?;
            def.size = Some(n.to_string());
        }
        for (k, v) in &props {
            match k.as_str() {
                "alias" => def.alias = Some(v.clone()),
                "blk" => def.block_size = v.parse().map_err(|_| RpcError::params(format!("blk={v} is not a number")))?,
                "guid" => def.guid = v.to_ascii_uppercase(),
                "serial" => def.serial = Some(v.clone()),
                "vid" => def.vid = Some(v.clone()),
                "pid" => def.pid = Some(v.clone()),
                "wcd" => def.write_cache = Some(!yes(k, v)?),
                "wp" => def.read_only = yes(k, v)?,
                "thin" | "unmap" => def.thin = Some(yes(k, v)?),
                "direct" if backend == BackendKind::File => def.direct = yes(k, v)?,
                "io_threads" if backend == BackendKind::File => {
                    def.io_threads = Some(v.parse().ok().filter(|n| (1..=MAX_IO_THREADS).contains(n)).ok_or_else(|| {
                        RpcError::params(format!("io_threads={v} is not a number 1..={MAX_IO_THREADS}"))
                    })?)
                }
                "conf" if backend == BackendKind::Rbd => def.ceph_conf = Some(v.clone()),
                "id" if backend == BackendKind::Rbd => def.ceph_id = Some(v.clone()),
                "size" => {
                    let n = parse_size(v).ok_or_else(|| RpcError::params(format!("size={v} is not a size")))?;
                    def.size = Some(n.to_string());
                }
                other => {
                    return Err(RpcError::params(format!(
                        "unknown property {other:?} (alias, blk, guid, serial, vid, pid, wcd, wp, thin, size; direct, io_threads for a file; conf, id for rbd:)"
                    )))
                }
            }
        }
        if def.guid.is_empty() {
            def.guid = guid_from_id(u64::from_str_radix(&random_hex(16), 16).unwrap_or(1));
        } else if !is_guid(&def.guid) {
            return Err(RpcError::params(format!(
                "guid {:?} must be 16 hex digits starting with 6",
                def.guid
            )));
        }
        if backend == BackendKind::File
            && def.size.is_none()
            && !std::path::Path::new(&path).exists()
        {
            return Err(RpcError::params(format!(
                "{path} does not exist: give a size (-s) to create it"
            )));
        }
        if matches!(backend, BackendKind::Memory | BackendKind::Null) && def.size.is_none() {
            return Err(RpcError::params("a memory LU needs a size (-s)"));
        }
        let guid = def.guid.clone();
        self.change(|c| {
            if c.all_lus()
                .iter()
                .any(|(l, _)| l.guid.eq_ignore_ascii_case(&guid))
            {
                return Err(RpcError::refused(format!("LU {guid} already exists")));
            }
            if let Some(a) = &def.alias {
                if c.find_lu(a).is_some() {
                    return Err(RpcError::refused(format!("alias {a} is already used")));
                }
            }
            c.lus.push(def);
            Ok(json!({"guid": guid}))
        })
        .await?;
        let m = self.registry.snapshot();
        Ok(m.lu(&guid)
            .map(|e| with_meta(lu_json(e, &m), e))
            .unwrap_or(json!({"guid": guid})))
    }

    async fn modify_lu(&self, p: Params<'_>) -> R {
        let lu = p.str("lu")?;
        let size = p.opt_str("size")?;
        let props = p.props()?;
        let have = self.lu_entry(&lu)?;
        let guid = have.def.guid.clone();
        let current = have
            .lu
            .num_blocks()
            .saturating_mul(u64::from(have.lu.block_size()));
        self.change(|c| {
            let i = c
                .find_lu(&guid)
                .ok_or_else(|| RpcError::refused(format!("no LU {lu}")))?;
            let Some(d) = c.lus.get_mut(i) else {
                return Err(RpcError::refused(format!("no LU {lu}")));
            };
            let mut sizes = vec![];
            if let Some(s) = size {
                sizes.push(s);
            }
            for (k, v) in props {
                match k.as_str() {
                    "size" => sizes.push(v),
                    "alias" => d.alias = (!v.is_empty()).then_some(v),
                    other => {
                        return Err(RpcError::params(format!(
                            "property {other:?} cannot change on a live LU (size, alias)"
                        )))
                    }
                }
            }
            for s in sizes {
                let n = parse_size(&s)
                    .ok_or_else(|| RpcError::params(format!("size {s:?} is not a size")))?;
                if n < current {
                    return Err(RpcError::refused(format!(
                        "LU {guid} is {current} bytes: its size can only grow"
                    )));
                }
                d.size = Some(n.to_string());
            }
            Ok(Value::Null)
        })
        .await?;
        let m = self.registry.snapshot();
        Ok(m.lu(&guid)
            .map(|e| with_meta(lu_json(e, &m), e))
            .unwrap_or(Value::Null))
    }

    /// stmfadm import-lu: registers a file LU again with the identity kept
    /// beside its data (see `lu_meta`). Views are not part of the identity.
    async fn import_lu(&self, p: Params<'_>) -> R {
        let path = p.str("path")?;
        let meta = p.opt_str("meta")?;
        if !std::path::Path::new(&path).is_absolute() {
            return Err(RpcError::params(format!("{path}: give an absolute path")));
        }
        let m = crate::lu_meta::load(
            std::path::Path::new(&path),
            meta.as_deref().map(std::path::Path::new),
        )
        .map_err(RpcError::refused)?;
        let def = m.to_def(&path).map_err(RpcError::refused)?;
        let guid = def.guid.clone();
        self.change(|c| {
            if let Some((l, _)) = c.all_lus().iter().find(|(l, _)| {
                l.guid.eq_ignore_ascii_case(&guid) || l.path.as_deref() == Some(&path)
            }) {
                return Err(RpcError::refused(format!(
                    "LU {} is registered already (on {})",
                    l.guid,
                    l.path.as_deref().unwrap_or("memory")
                )));
            }
            if let Some(a) = &def.alias {
                if c.find_lu(a).is_some() {
                    return Err(RpcError::refused(format!(
                        "alias {a} is used by another LU: delete or rename it first"
                    )));
                }
            }
            c.lus.push(def);
            Ok(Value::Null)
        })
        .await?;
        let m = self.registry.snapshot();
        Ok(m.lu(&guid)
            .map(|e| lu_json(e, &m))
            .unwrap_or(json!({"guid": guid})))
    }

    fn lu_entry(&self, name: &str) -> Result<Arc<LuEntry>, RpcError> {
        let m = self.registry.snapshot();
        let guid = lu_guid(&m, name);
        let e = m
            .lu(&guid)
            .cloned()
            .ok_or_else(|| RpcError::refused(format!("no LU {name}")))?;
        if let Some((t, lun)) = &e.implicit {
            return Err(RpcError::refused(format!(
                "LU {guid} is LUN {lun} of target {t} in the configuration file ([[target.lun]]); edit the file to change it"
            )));
        }
        Ok(e)
    }

    async fn delete_lu(&self, p: Params<'_>) -> R {
        let lu = p.str("lu")?;
        let guid = self.lu_entry(&lu)?.def.guid.clone();
        self.change(|c| {
            let i = c
                .find_lu(&guid)
                .ok_or_else(|| RpcError::refused(format!("no LU {lu}")))?;
            let d = c.lus.remove(i);
            let views_removed = c.views.iter().filter(|v| c_lu_is(&d, &v.lu)).count();
            c.views.retain(|v| !c_lu_is(&d, &v.lu));
            Ok(json!({"guid": guid, "views_removed": views_removed}))
        })
        .await
    }

    async fn set_lu_online(&self, p: Params<'_>, online: bool) -> R {
        let lu = p.str("lu")?;
        let guid = self.lu_entry(&lu)?.def.guid.clone();
        self.change(|c| {
            let i = c
                .find_lu(&guid)
                .ok_or_else(|| RpcError::refused(format!("no LU {lu}")))?;
            if let Some(d) = c.lus.get_mut(i) {
                d.online = online;
            }
            Ok(json!({"guid": guid, "online": online}))
        })
        .await
    }

    fn list_lu(&self, p: Params<'_>) -> R {
        let only = p.opt_str("lu")?;
        let m = self.registry.snapshot();
        let out: Vec<Value> = m
            .lus
            .values()
            .filter(|e| {
                only.as_deref().is_none_or(|o| {
                    e.def.guid.eq_ignore_ascii_case(o) || e.def.alias.as_deref() == Some(o)
                })
            })
            .map(|e| lu_json(e, &m))
            .collect();
        listed(out, only, "LU")
    }

    // ----- host and target groups -----

    async fn create_group(&self, p: Params<'_>, kind: Kind) -> R {
        let name = p.str("name")?;
        self.change(|c| {
            let groups = kind.groups(c);
            if groups.iter().any(|g| g.name == name) {
                return Err(RpcError::refused(format!(
                    "{} {name} already exists",
                    kind.label()
                )));
            }
            groups.push(GroupConfig {
                name: name.clone(),
                members: vec![],
            });
            Ok(json!({"name": name}))
        })
        .await
    }

    async fn delete_group(&self, p: Params<'_>, kind: Kind) -> R {
        let name = p.str("name")?;
        self.change(|c| {
            let used = c
                .views
                .iter()
                .filter(|v| kind.of_view(v) == Some(name.as_str()))
                .count();
            if used > 0 {
                return Err(RpcError::refused(format!(
                    "{} {name} is used by {used} view(s): remove-view first",
                    kind.label()
                )));
            }
            remove_or_refuse(
                kind.groups(c),
                |g| g.name == name,
                format!("no {} {name}", kind.label()),
            )?;
            Ok(json!({"name": name}))
        })
        .await
    }

    async fn group_members(&self, p: Params<'_>, kind: Kind, add: bool) -> R {
        let name = p.str("name")?;
        let members = p.str_list("members")?;
        if members.is_empty() {
            return Err(RpcError::params("name at least one member"));
        }
        for m in &members {
            check_name(m)?;
        }
        self.change(|c| {
            let label = kind.label();
            let g = kind
                .groups(c)
                .iter_mut()
                .find(|g| g.name == name)
                .ok_or_else(|| RpcError::refused(format!("no {label} {name}")))?;
            for m in &members {
                let at = g.members.iter().position(|x| x.eq_ignore_ascii_case(m));
                match (add, at) {
                    (true, Some(_)) => {
                        return Err(RpcError::refused(format!(
                            "{m} is already a member of {name}"
                        )))
                    }
                    (true, None) => g.members.push(m.clone()),
                    (false, Some(i)) => {
                        g.members.remove(i);
                    }
                    (false, None) => {
                        return Err(RpcError::refused(format!("{m} is not a member of {name}")))
                    }
                }
            }
            Ok(json!({"name": name, "members": g.members}))
        })
        .await
    }

    fn list_group(&self, p: Params<'_>, kind: Kind) -> R {
        let only = p.opt_str("name")?;
        let m = self.registry.snapshot();
        let groups = match kind {
            Kind::Host => &m.config.host_groups,
            Kind::Target => &m.config.target_groups,
        };
        let out: Vec<Value> = groups
            .iter()
            .filter(|g| only.as_deref().is_none_or(|o| o == g.name))
            .map(|g| json!({"name": g.name, "members": g.members}))
            .collect();
        listed(out, only, kind.label())
    }

    // ----- views -----

    async fn add_view(&self, p: Params<'_>) -> R {
        let lu = p.str("lu")?;
        let hg = p.opt_str("host_group")?;
        let tg = p.opt_str("target_group")?;
        let lun = p.opt_u64("lun")?;
        let guid = self.lu_entry(&lu)?.def.guid.clone();
        if lun.is_some_and(|l| l > MAX_LUN) {
            return Err(RpcError::params(format!("LUN must be 0..{MAX_LUN}")));
        }
        self.change(|c| {
            if let Some(h) = &hg {
                c.host_group(h)
                    .ok_or_else(|| RpcError::refused(format!("no host group {h}")))?;
            }
            if let Some(t) = &tg {
                c.target_group(t)
                    .ok_or_else(|| RpcError::refused(format!("no target group {t}")))?;
            }
            let lun = match lun {
                Some(l) => l,
                None => c
                    .free_lun(hg.as_deref(), tg.as_deref())
                    .ok_or_else(|| RpcError::refused("no free LUN for this view"))?,
            };
            let v = ViewConfig {
                lu: guid.clone(),
                host_group: hg.clone(),
                target_group: tg.clone(),
                lun,
            };
            if let Some(why) = c.view_conflict(&v, None) {
                return Err(RpcError::refused(format!("LUN {lun} is taken: {why}")));
            }
            c.views.push(v);
            Ok(
                json!({"lu": guid, "host_group": hg.as_deref().unwrap_or("All"),
                "target_group": tg.as_deref().unwrap_or("All"), "lun": lun}),
            )
        })
        .await
    }

    async fn remove_view(&self, p: Params<'_>) -> R {
        let lu = p.str("lu")?;
        let entries = p.opt_u64_list("entries")?;
        let all = p.opt_bool("all")?.unwrap_or(false);
        if entries.is_none() && !all {
            return Err(RpcError::params(
                "name the view entries to remove, or all (-a)",
            ));
        }
        let guid = self.lu_entry(&lu)?.def.guid.clone();
        self.change(|c| {
            let mine: Vec<usize> = c
                .views
                .iter()
                .enumerate()
                .filter(|(_, v)| v.lu.eq_ignore_ascii_case(&guid))
                .map(|(i, _)| i)
                .collect();
            let drop: Vec<usize> = match &entries {
                None => mine.clone(),
                Some(es) => {
                    let mut d = vec![];
                    for e in es {
                        let i = usize::try_from(*e)
                            .ok()
                            .and_then(|e| mine.get(e))
                            .ok_or_else(|| {
                                RpcError::refused(format!("LU {guid} has no view entry {e}"))
                            })?;
                        d.push(*i);
                    }
                    d
                }
            };
            if drop.is_empty() {
                return Err(RpcError::refused(format!("LU {guid} has no views")));
            }
            let mut i = 0;
            c.views.retain(|_| {
                let keep = !drop.contains(&i);
                i += 1;
                keep
            });
            Ok(json!({"lu": guid, "removed": drop.len()}))
        })
        .await
    }

    fn list_view(&self, p: Params<'_>) -> R {
        let lu = p.str("lu")?;
        let m = self.registry.snapshot();
        let e = m
            .lu(&lu_guid(&m, &lu))
            .cloned()
            .ok_or_else(|| RpcError::refused(format!("no LU {lu}")))?;
        Ok(Value::Array(views_of(&e, &m)))
    }
}

/// Writes a file LU's identity beside its data (for import-lu) and says
/// where in the answer; a failure is reported, not fatal to the change.
fn with_meta(mut v: Value, e: &LuEntry) -> Value {
    let (k, m) = match crate::lu_meta::save(e) {
        Ok(Some(p)) => ("metadata", json!(p.display().to_string())),
        Ok(None) => return v,
        Err(err) => {
            tracing::warn!(error = %err, guid = %e.def.guid, "LU metadata not written");
            ("metadata_error", json!(err))
        }
    };
    if let Some(o) = v.as_object_mut() {
        o.insert(k.into(), m);
    }
    v
}

/// A list answer; asking for one item (`only`) that is not there is refused.
fn listed(out: Vec<Value>, only: Option<impl std::fmt::Display>, what: &str) -> R {
    match only {
        Some(o) if out.is_empty() => Err(RpcError::refused(format!("no {what} {o}"))),
        _ => Ok(Value::Array(out)),
    }
}

/// Removes the items `gone` picks; refuses with `missing` if there were none.
fn remove_or_refuse<T>(
    items: &mut Vec<T>,
    gone: impl Fn(&T) -> bool,
    missing: String,
) -> Result<(), RpcError> {
    let before = items.len();
    items.retain(|x| !gone(x));
    if items.len() == before {
        return Err(RpcError::refused(missing));
    }
    Ok(())
}

/// Whether `s` is a session of target `target` (names compare caselessly).
fn serves(s: &Session, target: &str) -> bool {
    s.target_name
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case(target))
}

/// The GUID an LU name (GUID or alias in the document) stands for; a name
/// the document does not know is taken as a GUID.
fn lu_guid(m: &Model, name: &str) -> String {
    m.config
        .find_lu(name)
        .and_then(|i| m.config.lus.get(i))
        .map(|d| d.guid.clone())
        .unwrap_or_else(|| name.to_string())
}

fn c_lu_is(d: &LuDef, name: &str) -> bool {
    d.guid.eq_ignore_ascii_case(name) || d.alias.as_deref() == Some(name)
}

fn views_of(e: &LuEntry, m: &Model) -> Vec<Value> {
    if let Some((t, lun)) = &e.implicit {
        return vec![
            json!({"entry": 0, "host_group": "All", "target_group": format!("(target {t})"), "lun": lun, "implicit": true}),
        ];
    }
    m.config
        .views
        .iter()
        .filter(|v| c_lu_is(&e.def, &v.lu))
        .enumerate()
        .map(|(i, v)| {
            json!({"entry": i, "host_group": v.host_group.as_deref().unwrap_or("All"),
            "target_group": v.target_group.as_deref().unwrap_or("All"), "lun": v.lun})
        })
        .collect()
}

fn lu_json(e: &LuEntry, m: &Model) -> Value {
    let d = &e.def;
    let lu = &e.lu;
    let s = lu.stats();
    let c = lu.config();
    json!({
        "guid": d.guid,
        "alias": d.alias,
        "backend": match d.backend { BackendKind::Memory => "memory", BackendKind::File => "file", BackendKind::Null => "null", BackendKind::Rbd => "rbd" },
        "data_file": d.path.clone().unwrap_or_else(|| match d.backend { BackendKind::Null => "null".into(), BackendKind::Rbd => format!("rbd:{}/{}", d.pool.as_deref().unwrap_or(""), d.image.as_deref().unwrap_or("")), _ => "memory".into() }),
        "size": lu.num_blocks().saturating_mul(u64::from(lu.block_size())),
        "block_size": lu.block_size(),
        "operational_status": if d.online { "Online" } else { "Offline" },
        "vendor_id": c.vendor, "product_id": c.product, "serial": c.serial,
        "write_protect": c.read_only,
        "write_cache_disabled": !d.write_cache.unwrap_or(true),
        "thin": c.thin_provisioning,
        "direct": d.direct,
        "io_threads": (d.backend == BackendKind::File).then(|| lu.io_threads()),
        "view_entries": views_of(e, m).len(),
        "implicit": e.implicit.as_ref().map(|(t, l)| json!({"target": t, "lun": l})),
        "refs": Arc::strong_count(lu).saturating_sub(1),
        "stats": {"read_commands": s.read_commands, "read_bytes": s.read_bytes,
            "write_commands": s.write_commands, "write_bytes": s.write_bytes,
            "other_commands": s.other_commands, "errors": s.errors, "unit_attentions": s.unit_attentions},
    })
}

fn session_json(s: &Arc<Session>) -> Value {
    crate::inspect::session_json(s, false)
}

fn auth_name(a: AuthConfig) -> &'static str {
    match a {
        AuthConfig::None => "none",
        AuthConfig::Chap => "chap",
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Host,
    Target,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Host => "host group",
            Kind::Target => "target group",
        }
    }
    fn groups(self, c: &mut Config) -> &mut Vec<GroupConfig> {
        match self {
            Kind::Host => &mut c.host_groups,
            Kind::Target => &mut c.target_groups,
        }
    }
    fn of_view(self, v: &ViewConfig) -> Option<&str> {
        match self {
            Kind::Host => v.host_group.as_deref(),
            Kind::Target => v.target_group.as_deref(),
        }
    }
}

fn check_name(name: &str) -> Result<(), RpcError> {
    if is_iscsi_name(name) {
        Ok(())
    } else {
        Err(RpcError::params(format!(
            "{name:?} is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id], eui.16HEX, naa.HEX)"
        )))
    }
}

fn yes(k: &str, v: &str) -> Result<bool, RpcError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(RpcError::params(format!("{k}={v}: say true or false"))),
    }
}

/// "10.0.0.1", "10.0.0.1:3261", "[::1]:3260", "::1" → "ip:port".
fn parse_portal(s: &str) -> Result<String, RpcError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a.to_string());
    }
    if let Ok(ip) = s.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 3260).to_string());
    }
    Err(RpcError::params(format!(
        "{s:?} is not IP[:port] (IPv6 as [addr]:port)"
    )))
}

fn wanted_portals(c: &Config) -> Vec<(SocketAddr, u16)> {
    c.portal_groups
        .iter()
        .flat_map(|g| {
            g.portals
                .iter()
                .filter_map(move |p| Some((p.parse().ok()?, g.tag)))
        })
        .collect()
}

/// Binds the portals of `c` that are not running yet.
async fn bind_missing(c: &Config, running: &Portals) -> Result<Vec<Portal>, RpcError> {
    let mut out = Vec::new();
    for (addr, tag) in wanted_portals(c) {
        if running.contains_key(&(addr, tag)) {
            continue;
        }
        let group = c.portal_groups.iter().find(|g| g.tag == tag);
        let iser = group.is_some_and(|g| g.iser);
        let tcp = group.is_none_or(|g| g.tcp);
        match Portal::bind_kinds(addr, tag, tcp, iser).await {
            Ok(p) => out.push(p),
            Err(e) => return Err(RpcError::refused(format!("cannot listen on {addr}: {e}"))),
        }
    }
    Ok(out)
}

fn random_hex(digits: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; digits.div_ceil(2)];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let h = iscsi_target::config::stable_hash(&format!("{t}{}", std::process::id()));
        buf = h
            .to_be_bytes()
            .iter()
            .cycle()
            .take(buf.len())
            .copied()
            .collect();
    }
    let mut s: String = buf.iter().map(|b| format!("{b:02x}")).collect();
    s.truncate(digits);
    s
}

/// Typed access to a request's params, with readable errors.
#[derive(Clone, Copy)]
struct Params<'a>(&'a Value);

impl Params<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn str(&self, k: &str) -> Result<String, RpcError> {
        self.opt_str(k)?
            .ok_or_else(|| RpcError::params(format!("missing parameter {k:?}")))
    }
    fn opt_str(&self, k: &str) -> Result<Option<String>, RpcError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(RpcError::params(format!(
                "parameter {k:?} must be a string"
            ))),
        }
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>, RpcError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(RpcError::params(format!(
                "parameter {k:?} must be true or false"
            ))),
        }
    }
    fn opt_u64(&self, k: &str) -> Result<Option<u64>, RpcError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| RpcError::params(format!("parameter {k:?} must be a whole number"))),
        }
    }
    fn opt_tag(&self, k: &str) -> Result<Option<u16>, RpcError> {
        match self.opt_u64(k)? {
            None => Ok(None),
            Some(t) => match u16::try_from(t) {
                Ok(t) if t > 0 => Ok(Some(t)),
                _ => Err(RpcError::params(format!("{k} {t}: a TPG tag is 1..65535"))),
            },
        }
    }
    fn tag(&self, k: &str) -> Result<u16, RpcError> {
        self.opt_tag(k)?
            .ok_or_else(|| RpcError::params(format!("missing parameter {k:?}")))
    }
    fn opt_tags(&self, k: &str) -> Result<Option<Vec<u16>>, RpcError> {
        let Some(list) = self.opt_u64_list(k)? else {
            return Ok(None);
        };
        list.iter()
            .map(|t| match u16::try_from(*t) {
                Ok(t) if t > 0 => Ok(t),
                _ => Err(RpcError::params(format!("TPG tag {t} is not 1..65535"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
    fn opt_u64_list(&self, k: &str) -> Result<Option<Vec<u64>>, RpcError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .ok_or_else(|| RpcError::params(format!("{k} holds whole numbers")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(RpcError::params(format!("parameter {k:?} must be a list"))),
        }
    }
    fn opt_str_list(&self, k: &str) -> Result<Option<Vec<String>>, RpcError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| RpcError::params(format!("{k} holds strings")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(RpcError::params(format!("parameter {k:?} must be a list"))),
        }
    }
    fn str_list(&self, k: &str) -> Result<Vec<String>, RpcError> {
        self.opt_str_list(k)?
            .ok_or_else(|| RpcError::params(format!("missing parameter {k:?}")))
    }
    /// `Some(None)`: "default" (the defaults' method).
    fn opt_auth(&self, k: &str) -> Result<Option<Option<AuthConfig>>, RpcError> {
        match self.opt_str(k)?.as_deref() {
            None => Ok(None),
            Some("none") => Ok(Some(Some(AuthConfig::None))),
            Some("chap") => Ok(Some(Some(AuthConfig::Chap))),
            Some("default") => Ok(Some(None)),
            Some(o) => Err(RpcError::params(format!(
                "auth {o:?}: say chap, none or default"
            ))),
        }
    }
    fn props(&self) -> Result<Vec<(String, String)>, RpcError> {
        match self.get("props") {
            None => Ok(vec![]),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    Value::Bool(b) => Ok((k.clone(), b.to_string())),
                    Value::Number(n) => Ok((k.clone(), n.to_string())),
                    _ => Err(RpcError::params(format!("property {k} must be a string"))),
                })
                .collect(),
            Some(_) => Err(RpcError::params("props must be an object of name: value")),
        }
    }
}
