//! Live inspection and metrics for the API: the tree target → TPG →
//! session → connection → tasks (`inspect`), the counters per target, LU
//! and session (`metrics`, the `-v` lists) and their Prometheus text.
//!
//! Everything here reads: it takes the registry's snapshot, the session
//! table and each connection's published state (see
//! `iscsi_target::inspect`), and never blocks the data path.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;

use iscsi_target::inspect::{session_state_name, unix_ms, NegotiatedParams, StateLog, Transition};
use iscsi_target::metrics::{bucket_le_us, IoSnapshot, IoStats, BUCKETS};
use iscsi_target::registry::{LuEntry, Model};
use iscsi_target::session::Session;
use iscsi_target::Registry;
use scsi_target::LunMap;
use serde_json::{json, Value};

/// The counters as the API shows them (latency summarised; the buckets
/// that are not empty listed with their upper bound).
pub fn io_json(s: &IoSnapshot) -> Value {
    let l = &s.latency;
    let avg_us = l.sum_ns.checked_div(l.count).map(|ns| ns / 1000);
    let buckets: Vec<Value> = l
        .buckets
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| json!({"le_us": bucket_le_us(i), "count": n}))
        .collect();
    json!({
        "commands": s.commands,
        "read_commands": s.read_commands,
        "write_commands": s.write_commands,
        "bytes_read": s.bytes_read,
        "bytes_written": s.bytes_written,
        "check_conditions": s.check_conditions,
        "other_errors": s.other_errors,
        "task_aborts": s.task_aborts,
        "latency": {
            "count": l.count,
            "avg_us": avg_us,
            "p50_le_us": l.quantile_le_us(0.5),
            "p99_le_us": l.quantile_le_us(0.99),
            "buckets": buckets,
        },
    })
}

fn io_of(stats: Option<Arc<IoStats>>) -> IoSnapshot {
    stats.map(|s| s.snapshot()).unwrap_or_default()
}

fn transitions(recent: &std::collections::VecDeque<Transition>) -> Value {
    let now = unix_ms();
    Value::Array(
        recent
            .iter()
            .map(|t| {
                json!({"at_unix_ms": t.at_unix_ms, "ago_ms": now.saturating_sub(t.at_unix_ms),
                    "from": t.from, "event": t.event, "to": t.to})
            })
            .collect(),
    )
}

fn state_json<S: Copy>(log: &StateLog<S>, name: impl Fn(S) -> &'static str) -> (Value, Value) {
    (json!(name(log.state)), transitions(&log.recent))
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// The session-wide negotiated values.
fn session_params(p: &NegotiatedParams) -> Value {
    json!({
        "MaxBurstLength": p.max_burst_length,
        "FirstBurstLength": p.first_burst_length,
        "InitialR2T": yes_no(p.initial_r2t),
        "ImmediateData": yes_no(p.immediate_data),
        "MaxOutstandingR2T": p.max_outstanding_r2t,
        "MaxConnections": p.max_connections,
        "DataPDUInOrder": yes_no(p.data_pdu_in_order),
        "DataSequenceInOrder": yes_no(p.data_sequence_in_order),
        "DefaultTime2Wait": p.default_time2wait,
        "DefaultTime2Retain": p.default_time2retain,
        "ErrorRecoveryLevel": p.error_recovery_level,
    })
}

/// The connection-only negotiated values.
fn conn_params(p: &NegotiatedParams) -> Value {
    json!({
        "HeaderDigest": if p.header_digest { "CRC32C" } else { "None" },
        "DataDigest": if p.data_digest { "CRC32C" } else { "None" },
        "MaxRecvDataSegmentLength": p.max_recv_data_segment_length,
        "MaxXmitDataSegmentLength": p.max_xmit_data_segment_length,
    })
}

/// One session with its connections (and, with `tasks`, what is in
/// flight on each).
pub fn session_json(s: &Arc<Session>, tasks: bool) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let isid: String = s.isid.iter().map(|b| format!("{b:02x}")).collect();
    let (state, recent) = state_json(&s.state_log(), session_state_name);
    let mut conns = s.connections();
    conns.sort_by_key(|c| c.cid);
    let now = unix_ms();
    let conns_json: Vec<Value> = conns
        .iter()
        .map(|c| {
            let i = &c.info;
            let (cstate, crecent) = state_json(&i.state_log(), |x| x.rfc_name());
            let k = &i.counters;
            let mut v = json!({
                "cid": c.cid,
                "serial": c.serial,
                "peer": c.peer_addr,
                "local": c.local_addr,
                "state": cstate,
                "transitions": crecent,
                "logged_in_ms_ago": now.saturating_sub(i.logged_in_unix_ms),
                "params": conn_params(&i.params),
                "counters": {
                    "pdus_in": k.pdus_in.load(Relaxed),
                    "pdus_out": k.pdus_out.load(Relaxed),
                    "bytes_in": k.bytes_in.load(Relaxed),
                    "bytes_out": k.bytes_out.load(Relaxed),
                    "bytes_queued": k.bytes_queued.load(Relaxed),
                    "commands": k.commands.load(Relaxed),
                },
                "refs": Arc::strong_count(i).saturating_sub(1),
                "holders": [
                    {"holder": "session's connection list", "refs": 1},
                    // The reader, the writer, and each command running on a
                    // blocking thread (its reply path) hold the connection.
                    {"holder": "reader, writer and commands in backend",
                     "refs": Arc::strong_count(i).saturating_sub(2)},
                    {"holder": "this inspection", "refs": 1},
                ],
            });
            if tasks {
                if let Some(o) = v.as_object_mut() {
                    let t = i.tasks_in_flight();
                    o.insert("tasks".into(), json!(t));
                    o.insert(
                        "untracked_tasks".into(),
                        json!(i.tasks.untracked.load(Relaxed)),
                    );
                }
            }
            v
        })
        .collect();
    // Who holds the session: the table (while logged in), each
    // connection's tasks, and this inspection itself.
    let strong = Arc::strong_count(s);
    // Sessions listed here come from the table.
    let in_table = 1;
    let cids: Vec<String> = conns.iter().map(|c| c.cid.to_string()).collect();
    let holders = json!([
        {"holder": "session table", "refs": in_table},
        {"holder": format!("connection tasks (CID {})", if cids.is_empty() { "-".to_string() } else { cids.join(",") }),
         "refs": strong.saturating_sub(in_table + 1)},
        {"holder": "this inspection", "refs": 1},
    ]);
    let mut v = json!({
        "tsih": s.tsih,
        "isid": isid,
        "initiator": s.initiator_name,
        "target": s.target_name,
        "type": if s.target_name.is_some() { "normal" } else { "discovery" },
        "state": state,
        "transitions": recent,
        "created_ms_ago": now.saturating_sub(s.created_unix_ms),
        "exp_cmd_sn": s.exp_cmd_sn(),
        "max_cmd_sn": s.max_cmd_sn(),
        "tpgt": s.nexus.relative_target_port_id,
        "closing": s.is_closed(),
        "refs": strong.saturating_sub(1),
        "holders": holders,
        "params": merged_params(s, conns.first().map(|c| &c.info.params)),
        "session_params": session_params(&s.params),
        "counters": io_json(&s.io.snapshot()),
        "connections": conns_json,
    });
    if tasks {
        if let Some(o) = v.as_object_mut() {
            o.insert("held_commands".into(), json!(s.held_commands()));
        }
    }
    v
}

/// Session-wide values with the first connection's own (the shape
/// `list-session -v` has always had).
fn merged_params(s: &Session, first: Option<&NegotiatedParams>) -> Value {
    let mut p = session_params(&s.params);
    let c = conn_params(first.unwrap_or(&s.params));
    if let (Some(p), Value::Object(c)) = (p.as_object_mut(), c) {
        p.extend(c);
    }
    p
}

/// The LUN maps alive now (the model's all-hosts maps and each session's),
/// to name who holds each LU.
struct Maps {
    by_target: Vec<(String, Arc<LunMap>)>,
    by_session: Vec<(u16, String, Arc<LunMap>)>,
}

impl Maps {
    fn gather(m: &Model, sessions: &[Arc<Session>]) -> Maps {
        Maps {
            by_target: m
                .targets
                .iter()
                .map(|t| (t.iqn.clone(), t.luns.map()))
                .collect(),
            by_session: sessions
                .iter()
                .filter_map(|s| {
                    let t = s.target.as_ref()?;
                    Some((s.tsih, s.initiator_name.clone(), t.luns.map()))
                })
                .collect(),
        }
    }

    fn lun_of(map: &LunMap, lu: &Arc<scsi_target::LogicalUnit>) -> Option<u64> {
        map.luns()
            .find(|l| map.get(*l).is_some_and(|x| Arc::ptr_eq(x, lu)))
    }

    /// Named holders of `lu` and the refcount they explain.
    fn holders(&self, lu: &Arc<scsi_target::LogicalUnit>) -> Value {
        let mut out = vec![json!({"holder": "LU registry (configuration snapshot)", "refs": 1})];
        let mut seen = HashSet::new();
        let mut named = 1;
        for (iqn, map) in &self.by_target {
            if let Some(lun) = Self::lun_of(map, lu) {
                if seen.insert(Arc::as_ptr(map) as usize) {
                    named += 1;
                    out.push(json!({"holder": format!("target {iqn} LUN map (all hosts), LUN {lun}"), "refs": 1}));
                }
            }
        }
        for (tsih, ini, map) in &self.by_session {
            if let Some(lun) = Self::lun_of(map, lu) {
                if seen.insert(Arc::as_ptr(map) as usize) {
                    named += 1;
                    out.push(json!({"holder": format!("session TSIH {tsih} ({ini}) LUN map, LUN {lun}"), "refs": 1}));
                }
            }
        }
        let other = Arc::strong_count(lu).saturating_sub(named);
        if other > 0 {
            out.push(json!({"holder": "other (older snapshots, cached LUN maps, commands in flight)", "refs": other}));
        }
        Value::Array(out)
    }
}

fn lu_io(reg: &Registry, e: &LuEntry) -> IoSnapshot {
    io_of(reg.sessions.metrics.lu_if_any(e.lu.config().naa_id))
}

/// `itadm inspect [TARGET]`.
pub fn inspect(reg: &Registry, only: Option<&str>) -> Result<Value, String> {
    let m = reg.snapshot();
    let mut sessions = reg.sessions.all();
    sessions.sort_by_key(|s| s.tsih);
    if let Some(o) = only {
        if m.target(o).is_none() {
            return Err(format!("no target {o}"));
        }
    }
    let maps = Maps::gather(&m, &sessions);
    let mut targets = Vec::new();
    for t in &m.targets {
        if only.is_some_and(|o| !o.eq_ignore_ascii_case(&t.iqn)) {
            continue;
        }
        let of_target: Vec<&Arc<Session>> = sessions
            .iter()
            .filter(|s| {
                s.target_name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(&t.iqn))
            })
            .collect();
        let tpgs: Vec<Value> = t
            .portal_groups
            .iter()
            .map(|tag| {
                let portals: Vec<String> = m
                    .portal_group(*tag)
                    .map(|g| g.portals.iter().map(|p| p.to_string()).collect())
                    .unwrap_or_default();
                let ss: Vec<Value> = of_target
                    .iter()
                    .filter(|s| s.nexus.relative_target_port_id == *tag)
                    .map(|s| {
                        let mut v = session_json(s, true);
                        if let (Some(o), Some(st)) = (v.as_object_mut(), &s.target) {
                            let map = st.luns.map();
                            let luns: Vec<Value> = map
                                .luns()
                                .filter_map(|lun| {
                                    let lu = map.get(lun)?;
                                    let e = m.lus.values().find(|e| Arc::ptr_eq(&e.lu, lu));
                                    Some(json!({"lun": lun, "guid": e.map(|e| e.def.guid.clone()),
                                        "alias": e.and_then(|e| e.def.alias.clone()),
                                        "blocks": lu.num_blocks()}))
                                })
                                .collect();
                            o.insert("luns".into(), Value::Array(luns));
                        }
                        v
                    })
                    .collect();
                json!({"tag": tag, "portals": portals, "sessions": ss})
            })
            .collect();
        let online = m.config.target_online(&t.iqn);
        targets.push(json!({
            "target": t.iqn,
            "alias": t.alias,
            "online": online,
            "auth": match t.auth { iscsi_target::config::AuthConfig::None => "none", iscsi_target::config::AuthConfig::Chap => "chap" },
            "sessions": of_target.len(),
            "refs": Arc::strong_count(t),
            "holders": [
                {"holder": "configuration snapshot", "refs": Arc::strong_count(t)},
                {"holder": "sessions (each holds its own view of the target)", "count": of_target.len()},
            ],
            "counters": io_json(&reg.sessions.target_io(&t.iqn)),
            "tpgs": tpgs,
        }));
    }
    let discovery: Vec<Value> = sessions
        .iter()
        .filter(|s| s.target_name.is_none() && only.is_none())
        .map(|s| session_json(s, true))
        .collect();
    let lus: Vec<Value> = m
        .lus
        .values()
        .map(|e| {
            json!({
                "guid": e.def.guid,
                "alias": e.def.alias,
                "online": e.def.online,
                "size": e.lu.num_blocks().saturating_mul(u64::from(e.lu.block_size())),
                "refs": Arc::strong_count(&e.lu),
                "holders": maps.holders(&e.lu),
                "counters": io_json(&lu_io(reg, e)),
            })
        })
        .collect();
    let iser = iscsi_target::inspect::iser_registered_memory();
    Ok(json!({
        "generation": m.generation,
        "iser": {"regions": iser.regions, "registered_bytes": iser.bytes},
        "targets": targets,
        "discovery_sessions": discovery,
        "lus": lus,
    }))
}

/// Adds each target's counters to a `list-target` answer.
pub fn with_target_io(reg: &Registry, mut v: Value) -> Value {
    if let Value::Array(items) = &mut v {
        for t in items {
            let io = t
                .get("name")
                .and_then(Value::as_str)
                .map(|n| reg.sessions.target_io(n))
                .unwrap_or_default();
            let online = t
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| reg.snapshot().config.target_online(n));
            if let Some(o) = t.as_object_mut() {
                o.insert("counters".into(), io_json(&io));
                o.insert(
                    "operational_status".into(),
                    json!(if online { "online" } else { "offline" }),
                );
            }
        }
    }
    v
}

/// Adds each LU's port-side counters (latency, errors) to a `list-lu` answer.
pub fn with_lu_io(reg: &Registry, mut v: Value) -> Value {
    let m = reg.snapshot();
    if let Value::Array(items) = &mut v {
        for l in items {
            let io = l
                .get("guid")
                .and_then(Value::as_str)
                .and_then(|g| m.lu(g))
                .map(|e| lu_io(reg, e))
                .unwrap_or_default();
            if let Some(o) = l.as_object_mut() {
                o.insert("counters".into(), io_json(&io));
            }
        }
    }
    v
}

/// The `metrics` answer: counters per target, LU and session.
pub fn metrics(reg: &Registry) -> Value {
    let m = reg.snapshot();
    let mut sessions = reg.sessions.all();
    sessions.sort_by_key(|s| s.tsih);
    json!({
        "targets": m.targets.iter().map(|t| json!({
            "target": t.iqn,
            "sessions": sessions.iter().filter(|s| s.target_name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(&t.iqn))).count(),
            "counters": io_json(&reg.sessions.target_io(&t.iqn)),
        })).collect::<Vec<_>>(),
        "lus": m.lus.values().map(|e| json!({
            "guid": e.def.guid,
            "alias": e.def.alias,
            "counters": io_json(&lu_io(reg, e)),
        })).collect::<Vec<_>>(),
        "sessions": sessions.iter().filter(|s| s.target_name.is_some()).map(|s| json!({
            "tsih": s.tsih,
            "initiator": s.initiator_name,
            "target": s.target_name,
            "counters": io_json(&s.io.snapshot()),
        })).collect::<Vec<_>>(),
    })
}

/// Forgets the counters of targets and LUs that are no longer configured.
pub fn prune(reg: &Registry) {
    let m = reg.snapshot();
    let targets: Vec<String> = m.targets.iter().map(|t| t.iqn.clone()).collect();
    let lus: Vec<u64> = m.lus.values().map(|e| e.lu.config().naa_id).collect();
    reg.sessions.metrics.retain(&targets, &lus);
}

/// A Prometheus label value, escaped (text format 0.0.4).
fn label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// One family of series (scope "target", "lu" or "session").
struct Family<'a> {
    scope: &'a str,
    rows: Vec<(String, IoSnapshot)>,
}

fn counter_family(
    out: &mut String,
    f: &Family<'_>,
    name: &str,
    help: &str,
    get: fn(&IoSnapshot) -> u64,
) {
    let full = format!("ironstar_{}_{name}", f.scope);
    let _ = writeln!(out, "# HELP {full} {help}");
    let _ = writeln!(out, "# TYPE {full} counter");
    for (labels, s) in &f.rows {
        let _ = writeln!(out, "{full}{{{labels}}} {}", get(s));
    }
}

fn histogram_family(out: &mut String, f: &Family<'_>) {
    let full = format!("ironstar_{}_latency_seconds", f.scope);
    let _ = writeln!(
        out,
        "# HELP {full} Command latency from arrival to response queued."
    );
    let _ = writeln!(out, "# TYPE {full} histogram");
    for (labels, s) in &f.rows {
        let mut cum = 0;
        for i in 0..BUCKETS {
            cum += s.latency.buckets.get(i).copied().unwrap_or(0);
            let le = match bucket_le_us(i) {
                Some(us) => format!("{}", us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{full}_bucket{{{labels},le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(
            out,
            "{full}_sum{{{labels}}} {}",
            s.latency.sum_ns as f64 / 1e9
        );
        let _ = writeln!(out, "{full}_count{{{labels}}} {}", s.latency.count);
    }
}

fn families(out: &mut String, f: &Family<'_>) {
    counter_family(out, f, "commands_total", "SCSI commands completed.", |s| {
        s.commands
    });
    counter_family(
        out,
        f,
        "read_commands_total",
        "Commands with Data-In.",
        |s| s.read_commands,
    );
    counter_family(
        out,
        f,
        "write_commands_total",
        "Commands with Data-Out.",
        |s| s.write_commands,
    );
    counter_family(
        out,
        f,
        "read_bytes_total",
        "Data-In bytes sent to initiators.",
        |s| s.bytes_read,
    );
    counter_family(
        out,
        f,
        "written_bytes_total",
        "Data-Out bytes written.",
        |s| s.bytes_written,
    );
    counter_family(
        out,
        f,
        "check_conditions_total",
        "Commands ended with CHECK CONDITION.",
        |s| s.check_conditions,
    );
    counter_family(
        out,
        f,
        "other_errors_total",
        "Commands ended with BUSY, TASK SET FULL or RESERVATION CONFLICT.",
        |s| s.other_errors,
    );
    counter_family(
        out,
        f,
        "task_aborts_total",
        "Tasks ended by task management.",
        |s| s.task_aborts,
    );
    histogram_family(out, f);
}

/// The Prometheus text exposition (format 0.0.4) of every counter.
pub fn prometheus(reg: &Registry) -> String {
    let m = reg.snapshot();
    let mut sessions = reg.sessions.all();
    sessions.sort_by_key(|s| s.tsih);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ironstar_sessions Sessions logged in, per target."
    );
    let _ = writeln!(out, "# TYPE ironstar_sessions gauge");
    for t in &m.targets {
        let n = sessions
            .iter()
            .filter(|s| {
                s.target_name
                    .as_deref()
                    .is_some_and(|x| x.eq_ignore_ascii_case(&t.iqn))
            })
            .count();
        let _ = writeln!(out, "ironstar_sessions{{target=\"{}\"}} {n}", label(&t.iqn));
    }
    let targets = Family {
        scope: "target",
        rows: m
            .targets
            .iter()
            .map(|t| {
                (
                    format!("target=\"{}\"", label(&t.iqn)),
                    reg.sessions.target_io(&t.iqn),
                )
            })
            .collect(),
    };
    families(&mut out, &targets);
    let lus = Family {
        scope: "lu",
        rows: m
            .lus
            .values()
            .map(|e| {
                (
                    format!(
                        "lu=\"{}\",alias=\"{}\"",
                        label(&e.def.guid),
                        label(e.def.alias.as_deref().unwrap_or(""))
                    ),
                    lu_io(reg, e),
                )
            })
            .collect(),
    };
    families(&mut out, &lus);
    let ss = Family {
        scope: "session",
        rows: sessions
            .iter()
            .filter(|s| s.target_name.is_some())
            .map(|s| {
                (
                    format!(
                        "tsih=\"{}\",initiator=\"{}\",target=\"{}\"",
                        s.tsih,
                        label(&s.initiator_name),
                        label(s.target_name.as_deref().unwrap_or(""))
                    ),
                    s.io.snapshot(),
                )
            })
            .collect(),
    };
    families(&mut out, &ss);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use iscsi_target::metrics::{Dir, Finished};

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histogram_lines_are_cumulative_and_end_with_inf() {
        let s = IoStats::default();
        for ns in [500, 3_000, 3_000, 2_000_000] {
            s.record(&Finished {
                dir: Dir::Read,
                bytes_read: 4096,
                bytes_written: 0,
                status: 0,
                latency_ns: ns,
            });
        }
        let f = Family {
            scope: "lu",
            rows: vec![("lu=\"x\"".into(), s.snapshot())],
        };
        let mut out = String::new();
        families(&mut out, &f);
        assert!(
            out.contains("ironstar_lu_read_bytes_total{lu=\"x\"} 16384\n"),
            "{out}"
        );
        assert!(
            out.contains("ironstar_lu_latency_seconds_bucket{lu=\"x\",le=\"0.000004\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("ironstar_lu_latency_seconds_bucket{lu=\"x\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("ironstar_lu_latency_seconds_count{lu=\"x\"} 4\n"),
            "{out}"
        );
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(series.ends_with('}'), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
