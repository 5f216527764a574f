//! The iSNS client (RFC 4171): keeps each configured iSNS server's view of
//! this daemon — one network entity, every target node with its alias, the
//! portals and the portal groups (PGTs) that serve each node — in step with
//! the live configuration.
//!
//! A supervisor follows the registry's snapshots (a cheap generation check
//! every [`POLL`]) and hands each server's worker the registration it
//! should hold. A worker talks to its server alone, one short TCP exchange
//! per transaction (DevAttrReg with the replace bit, or DevDereg), retries
//! with exponential backoff while the server is away, refreshes before the
//! registration period runs out, and deregisters the entity when iSNS is
//! turned off, the server is removed, or the daemon stops. Nothing here is
//! on the data path or holds a lock an RPC waits for. The messages
//! themselves come from `iscsi_target::isns` (sans-IO).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use iscsi_target::config::Config;
use iscsi_target::isns::{self, Message, Node, Registration};
use iscsi_target::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the supervisor looks for a new configuration snapshot.
const POLL: Duration = Duration::from_millis(250);
/// Registration period asked of the server; refreshed at a third of it.
const PERIOD_SECS: u32 = 900;
/// One transaction (connect, send, answer) may take this long.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// What a worker should make its server hold.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    Registered(Registration),
    /// Deregister and stop (iSNS off, server removed, daemon stopping).
    Gone,
}

/// Each server's state in words, for `itadm list-defaults`.
pub type Status = Arc<std::sync::Mutex<BTreeMap<String, String>>>;

fn set_status(status: &Status, server: &str, text: Option<String>) {
    let mut m = match status.lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    match text {
        Some(t) => m.insert(server.to_string(), t),
        None => m.remove(server),
    };
}

/// The running client; [`IsnsClient::shutdown`] deregisters everywhere.
pub struct IsnsClient {
    stop: watch::Sender<bool>,
    supervisor: JoinHandle<()>,
    status: Status,
}

impl IsnsClient {
    pub fn spawn(registry: Arc<Registry>, config_path: &Path) -> IsnsClient {
        let entity = entity_id(config_path);
        let (stop, stop_rx) = watch::channel(false);
        let status = Status::default();
        let supervisor = tokio::spawn(supervise(registry, entity, stop_rx, status.clone()));
        IsnsClient {
            stop,
            supervisor,
            status,
        }
    }

    /// Where each configured server stands (shared, kept current).
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    /// Deregisters from every server (bounded wait), then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(6), self.supervisor)
            .await
            .is_err()
        {
            tracing::warn!("iSNS: deregistration did not finish in time");
        }
    }
}

/// The entity identifier: stable across restarts of this daemon (its host
/// and configuration file), distinct for two daemons on one host.
fn entity_id(config_path: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "localhost".into()
    } else {
        host
    };
    let path = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    let h = iscsi_target::config::stable_hash(&path.to_string_lossy());
    format!("iscsitd:{host}:{:08x}", h as u32)
}

/// The registration the configuration asks for, and the servers to hold it.
fn desired(config: &Config, entity: &str) -> (Vec<String>, Registration) {
    let servers = if config.defaults.isns {
        config.defaults.isns_servers.clone()
    } else {
        vec![]
    };
    let nodes = config
        .targets
        .iter()
        .map(|t| Node {
            name: t.iqn.clone(),
            alias: t.alias.clone(),
            portal_groups: t
                .portal_groups
                .iter()
                .filter_map(|tag| config.portal_groups.iter().find(|g| g.tag == *tag))
                .flat_map(|g| {
                    g.portals
                        .iter()
                        .filter_map(|p| p.parse::<SocketAddr>().ok())
                        // A wildcard or ephemeral portal is no address an
                        // initiator could use.
                        .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
                        .map(move |a| (a, g.tag))
                })
                .collect(),
        })
        .collect();
    (
        servers,
        Registration {
            entity: entity.to_string(),
            period: PERIOD_SECS,
            nodes,
        },
    )
}

async fn supervise(
    registry: Arc<Registry>,
    entity: String,
    mut stop: watch::Receiver<bool>,
    status: Status,
) {
    let mut workers: HashMap<String, (watch::Sender<Want>, JoinHandle<()>)> = HashMap::new();
    // Workers deregistering from a server that was removed; one added back
    // waits for them, so a late deregistration cannot undo its register.
    let mut retiring: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut seen = u64::MAX;
    loop {
        let model = registry.snapshot();
        if model.generation != seen {
            seen = model.generation;
            let (servers, reg) = desired(&model.config, &entity);
            let gone: Vec<String> = workers
                .keys()
                .filter(|k| !servers.contains(k))
                .cloned()
                .collect();
            for server in gone {
                if let Some((tx, task)) = workers.remove(&server) {
                    let _ = tx.send(Want::Gone);
                    retiring.insert(server, task);
                }
            }
            retiring.retain(|_, t| !t.is_finished());
            for s in servers {
                let want = Want::Registered(reg.clone());
                match workers.get(&s) {
                    Some((tx, _)) => {
                        tx.send_if_modified(|w| {
                            let changed = *w != want;
                            *w = want.clone();
                            changed
                        });
                    }
                    None => {
                        let (tx, rx) = watch::channel(want);
                        let before = retiring.remove(&s);
                        let task = tokio::spawn(work(s.clone(), rx, before, status.clone()));
                        workers.insert(s, (tx, task));
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => break,
        }
    }
    for (_, (tx, task)) in workers.drain() {
        let _ = tx.send(Want::Gone);
        let _ = task.await;
    }
    for (_, task) in retiring.drain() {
        let _ = task.await;
    }
}

/// One server's worker (see the module doc).
async fn work(
    server: String,
    mut want: watch::Receiver<Want>,
    before: Option<JoinHandle<()>>,
    status: Status,
) {
    if let Some(b) = before {
        let _ = b.await;
    }
    // What the server holds as far as we know (None: nothing of ours).
    let mut held: Option<Registration> = None;
    let mut xid: u16 = 0;
    let mut backoff = BACKOFF_MIN;
    loop {
        let w = want.borrow_and_update().clone();
        let result = match &w {
            Want::Gone => {
                if let Some(h) = held.as_ref().filter(|h| !h.nodes.is_empty()) {
                    xid = xid.wrapping_add(1);
                    let src = h.source().unwrap_or(&h.entity).to_string();
                    let msg = isns::dereg_entity(&src, &h.entity, xid);
                    // Two tries: stopping must not wait on a dead server.
                    for _ in 0..2 {
                        match exchange(&server, &msg).await {
                            Ok(_) => {
                                tracing::info!(server, entity = %h.entity, "iSNS: deregistered");
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(server, error = %e, "iSNS: deregistration failed")
                            }
                        }
                    }
                }
                set_status(&status, &server, None);
                return;
            }
            Want::Registered(r) => sync(&server, r, held.as_ref(), &mut xid).await,
        };
        let wait = match result {
            Ok(granted) => {
                if let Want::Registered(r) = w {
                    if held.as_ref() != Some(&r) {
                        tracing::info!(server, entity = %r.entity, nodes = r.nodes.len(),
                            portals = r.portals().len(), "iSNS: registered");
                    }
                    let text = if r.nodes.is_empty() {
                        "nothing to register (no targets)".to_string()
                    } else {
                        format!(
                            "registered: {} target(s), {} portal(s), entity {}",
                            r.nodes.len(),
                            r.portals().len(),
                            r.entity
                        )
                    };
                    set_status(&status, &server, Some(text));
                    held = Some(r);
                }
                backoff = BACKOFF_MIN;
                // Refresh well inside the period the server granted (it may
                // shorten ours: open-isns caps it at its own setting).
                let period = granted
                    .filter(|p| *p > 0)
                    .unwrap_or(PERIOD_SECS)
                    .min(PERIOD_SECS);
                Duration::from_secs(u64::from(period / 3).max(5))
            }
            Err(e) => {
                tracing::warn!(server, error = %e, retry_in = ?backoff, "iSNS: server unreachable or refused");
                set_status(
                    &status,
                    &server,
                    Some(format!(
                        "not registered: {e} (retry in {}s)",
                        backoff.as_secs()
                    )),
                );
                let b = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                b
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = want.changed() => {
                if r.is_err() {
                    // The supervisor is gone without a word: stop quietly.
                    return;
                }
            }
        }
    }
}

/// Makes the server hold `r` (or nothing, when `r` has no nodes); answers
/// the registration period the server granted, if it said.
async fn sync(
    server: &str,
    r: &Registration,
    held: Option<&Registration>,
    xid: &mut u16,
) -> Result<Option<u32>, String> {
    *xid = xid.wrapping_add(1);
    if r.nodes.is_empty() {
        // Nothing to offer: an entity without nodes would only mislead
        // initiators, so the old one goes.
        return match held.filter(|h| !h.nodes.is_empty()) {
            Some(h) => {
                let src = h.source().unwrap_or(&h.entity);
                exchange(server, &isns::dereg_entity(src, &h.entity, *xid))
                    .await
                    .map(|_| None)
            }
            None => Ok(None),
        };
    }
    let rsp = exchange(server, &r.dev_attr_reg(*xid, true)).await?;
    Ok(rsp
        .operating()
        .iter()
        .find(|a| a.tag == isns::tag::REGISTRATION_PERIOD)
        .and_then(isns::Attr::as_u32))
}

/// Resolves "IP", "IP:port", "[v6]:port", "host" or "host:port".
async fn resolve(server: &str) -> Result<SocketAddr, String> {
    match isns::parse_server(server)? {
        isns::Server::Addr(a) => Ok(a),
        isns::Server::Host(h, p) => tokio::net::lookup_host((h.as_str(), p))
            .await
            .map_err(|e| format!("cannot resolve {server}: {e}"))?
            .next()
            .ok_or_else(|| format!("{server} has no address")),
    }
}

/// One request and its response on a fresh connection; a server-initiated
/// message that arrives first (ESI) is answered on the way.
async fn exchange(server: &str, req: &Message) -> Result<Message, String> {
    let go = async {
        let addr = resolve(server).await?;
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.write_all(&req.encode())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut d = isns::Decoder::new();
        let mut buf = vec![0u8; 8192];
        loop {
            while let Some(m) = d.next_message().map_err(|e| e.to_string())? {
                if let Some(answer) = isns::answer_server_message(&m) {
                    s.write_all(&answer.encode())
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                    continue;
                }
                if m.is_response() {
                    return isns::check_response(req, &m).map(|()| m);
                }
            }
            let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("server closed the connection without an answer".into());
            }
            d.push(buf.get(..n).unwrap_or_default());
        }
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, go)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml(
            r#"
[defaults]
isns = true
isns_servers = ["127.0.0.1:3205"]
[[portal_group]]
tag = 1
portals = ["192.0.2.1:3260", "0.0.0.0:3260"]
[[portal_group]]
tag = 2
portals = ["192.0.2.2:3261"]
[[target]]
iqn = "iqn.2026-11.dev.ironstar:a"
alias = "a"
portal_groups = [1, 2]
[[target]]
iqn = "iqn.2026-11.dev.ironstar:b"
portal_groups = [2]
"#,
        )
        .unwrap()
    }

    #[test]
    fn registration_follows_targets_and_their_portal_groups() {
        let (servers, r) = desired(&config(), "e");
        assert_eq!(servers, vec!["127.0.0.1:3205".to_string()]);
        assert_eq!(r.nodes.len(), 2);
        let a = &r.nodes[0];
        assert_eq!(a.alias.as_deref(), Some("a"));
        // The wildcard portal is left out; PGTs are the TPG tags.
        let pgs: Vec<(String, u16)> = a
            .portal_groups
            .iter()
            .map(|(p, t)| (p.to_string(), *t))
            .collect();
        assert_eq!(
            pgs,
            vec![("192.0.2.1:3260".into(), 1), ("192.0.2.2:3261".into(), 2)]
        );
        assert_eq!(r.portals().len(), 2);
    }

    #[test]
    fn isns_off_means_no_server() {
        let mut c = config();
        c.defaults.isns = false;
        assert!(desired(&c, "e").0.is_empty());
    }

    #[tokio::test]
    async fn an_absent_server_is_an_error_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (_, r) = desired(&config(), "e");
        let e = exchange(&format!("127.0.0.1:{port}"), &r.dev_attr_reg(1, true))
            .await
            .unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }

    #[tokio::test]
    async fn a_refusal_status_is_reported() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut d = isns::Decoder::new();
            let mut buf = vec![0u8; 4096];
            let req = loop {
                let n = s.read(&mut buf).await.unwrap();
                d.push(&buf[..n]);
                if let Some(m) = d.next_message().unwrap() {
                    break m;
                }
            };
            // An ESI first, then the refusal.
            let esi = Message {
                function: isns::function::ESI,
                flags: isns::flags::SERVER,
                xid: 99,
                status: None,
                attrs: vec![],
            };
            s.write_all(&esi.encode()).await.unwrap();
            let rsp = Message {
                function: req.function | isns::function::RESPONSE,
                flags: isns::flags::SERVER,
                xid: req.xid,
                status: Some(3),
                attrs: vec![],
            };
            s.write_all(&rsp.encode()).await.unwrap();
            // The ESI was answered.
            let mut d = isns::Decoder::new();
            let n = s.read(&mut buf).await.unwrap();
            d.push(&buf[..n]);
            let a = d.next_message().unwrap().unwrap();
            assert_eq!((a.function, a.xid), (0x800D, 99));
        });
        let (_, r) = desired(&config(), "e");
        let e = exchange(&addr.to_string(), &r.dev_attr_reg(1, true))
            .await
            .unwrap_err();
        assert!(e.contains("invalid registration"), "{e}");
        server.await.unwrap();
    }
}
