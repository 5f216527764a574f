//! itadm: the iSCSI port of Ironstar — targets, target portal groups,
//! initiators (CHAP), defaults, sessions and live inspection.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ironstar_admin::cli::{arr, arr_at, quiet, run_verb, Global, Show};
use ironstar_admin::{
    cell, detail, holders_line, io_line, pairs_line, read_secret, table, table_at, tag_list,
    transitions_lines, Failure,
};
use serde_json::{json, Map, Value};

#[derive(Parser)]
#[command(
    name = "itadm",
    version,
    about = "Administer Ironstar's iSCSI targets, portal groups, initiators and defaults",
    after_help = "Examples:\n  itadm create-tpg 1 192.168.1.10 192.168.1.11:3261\n  itadm create-target -n iqn.2026-11.dev.ironstar:db -t 1 -l db\n  itadm create-initiator -s iqn.1994-05.com.redhat:client   # prompts for its CHAP secret\n  itadm modify-target -a chap iqn.2026-11.dev.ironstar:db\n  itadm list-target -v\n  itadm list-session -v\n  itadm inspect iqn.2026-11.dev.ironstar:db\n  itadm --json inspect | jq .\n  itadm metrics\n  itadm modify-defaults --metrics-listen 127.0.0.1:9283   # then: curl -s 127.0.0.1:9283/metrics"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct TargetOpts {
    /// TPG tags, comma separated.
    #[arg(short = 't', long = "tpg", value_name = "TPG,...")]
    tpgs: Option<String>,
    /// Authentication: chap, none, or default (the defaults' method).
    #[arg(short, long)]
    auth: Option<String>,
    /// Set the target's CHAP secret (mutual CHAP), read from a prompt.
    #[arg(short = 's', long = "chap-secret")]
    secret: bool,
    /// Read the target's CHAP secret from the first line of FILE.
    #[arg(short = 'S', long = "chap-secret-file", value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// The target's CHAP user name (default: the target name).
    #[arg(short = 'u', long = "chap-user")]
    user: Option<String>,
    /// Alias.
    #[arg(short = 'l', long)]
    alias: Option<String>,
}

#[derive(clap::Args)]
struct InitiatorOpts {
    /// Set the initiator's CHAP secret, read from a prompt.
    #[arg(short = 's', long = "chap-secret")]
    secret: bool,
    /// Read the CHAP secret from the first line of FILE.
    #[arg(short = 'S', long = "chap-secret-file", value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// CHAP user name (default: the initiator name).
    #[arg(short = 'u', long = "chap-user")]
    user: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a target (a name is made up when -n is not given).
    CreateTarget {
        #[arg(short = 'n', long = "node-name")]
        name: Option<String>,
        #[command(flatten)]
        o: TargetOpts,
    },
    /// Change a target's TPGs, auth method, CHAP credentials or alias.
    ModifyTarget {
        #[command(flatten)]
        o: TargetOpts,
        name: String,
    },
    /// Delete a target; with sessions only when forced (they are logged out).
    DeleteTarget {
        #[arg(short, long)]
        force: bool,
        name: String,
    },
    /// List targets with their session counts.
    ListTarget {
        #[arg(short, long)]
        verbose: bool,
        name: Option<String>,
    },
    /// Create a target portal group: TAG and one or more IP[:port].
    CreateTpg {
        /// Also listen for iSER on these portals (needs an RDMA device).
        #[arg(long)]
        iser: bool,
        /// Listen for iSER only, not TCP.
        #[arg(long, conflicts_with = "iser")]
        iser_only: bool,
        tag: u64,
        #[arg(required = true)]
        portals: Vec<String>,
    },
    /// Delete a target portal group (refused while a target uses it).
    DeleteTpg { tag: u64 },
    /// List target portal groups.
    ListTpg {
        #[arg(short, long)]
        verbose: bool,
        tag: Option<u64>,
    },
    /// Register an initiator's CHAP credentials.
    CreateInitiator {
        #[command(flatten)]
        o: InitiatorOpts,
        name: String,
    },
    /// Change an initiator's CHAP credentials.
    ModifyInitiator {
        #[command(flatten)]
        o: InitiatorOpts,
        name: String,
    },
    /// Forget an initiator.
    DeleteInitiator { name: String },
    /// List initiators.
    ListInitiator {
        #[arg(short, long)]
        verbose: bool,
        name: Option<String>,
    },
    /// Change the defaults: auth method, CHAP algorithms, iSNS, metrics listener.
    ModifyDefaults {
        /// chap or none.
        #[arg(short, long)]
        auth: Option<String>,
        /// Allowed CHAP algorithms in order: sha3-256,sha256,sha1,md5.
        #[arg(long, value_name = "ALG,...")]
        chap_algorithms: Option<String>,
        /// iSNS on or off.
        #[arg(short = 'i', long, value_parser = ["enable", "disable"])]
        isns: Option<String>,
        /// iSNS servers (IP[:port], comma separated; empty to clear).
        #[arg(long, value_name = "SERVER,...")]
        isns_server: Option<String>,
        /// Serve Prometheus metrics (GET /metrics) on a loopback IP:port; "off" to stop.
        #[arg(long, value_name = "IP:PORT|off")]
        metrics_listen: Option<String>,
    },
    /// Show the defaults.
    ListDefaults,
    /// List sessions (-v: connections and negotiated parameters).
    ListSession {
        #[arg(short, long)]
        verbose: bool,
        target: Option<String>,
    },
    /// The live tree: target → TPG → session → connection → tasks in flight.
    ///
    /// Each session and connection with its state machine (Q1–Q5, S1–S8) and
    /// recent transitions, negotiated values, counters, and who holds it.
    #[command(
        after_help = "Examples:\n  itadm inspect\n  itadm inspect iqn.2026-11.dev.ironstar:db\n  itadm --json inspect   # for scripts"
    )]
    Inspect { target: Option<String> },
    /// I/O counters and latency per target, LU and session.
    Metrics,
}

fn secret(flag: bool, file: &Option<PathBuf>) -> Result<Option<String>, Failure> {
    if flag || file.is_some() {
        read_secret(file.as_deref()).map(Some)
    } else {
        Ok(None)
    }
}

fn target_params(o: &TargetOpts, name: Option<String>) -> Result<Value, Failure> {
    let mut p = Map::new();
    if let Some(n) = name {
        p.insert("name".into(), json!(n));
    }
    if let Some(t) = &o.tpgs {
        p.insert("tpgs".into(), json!(tag_list(t)?));
    }
    if let Some(a) = &o.auth {
        p.insert("auth".into(), json!(a));
    }
    if let Some(s) = secret(o.secret, &o.secret_file)? {
        p.insert("chap_secret".into(), json!(s));
    }
    if let Some(u) = &o.user {
        p.insert("chap_user".into(), json!(u));
    }
    if let Some(l) = &o.alias {
        p.insert("alias".into(), json!(l));
    }
    Ok(Value::Object(p))
}

fn initiator_params(o: &InitiatorOpts, name: String) -> Result<Value, Failure> {
    let mut p = Map::new();
    p.insert("name".into(), json!(name));
    if let Some(s) = secret(o.secret, &o.secret_file)? {
        p.insert("chap_secret".into(), json!(s));
    }
    if let Some(u) = &o.user {
        p.insert("chap_user".into(), json!(u));
    }
    Ok(Value::Object(p))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    run_verb("itadm", &cli.global, |c| {
        let (result, show): (Value, Show) = match cli.cmd {
            Cmd::CreateTarget { name, o } => {
                let r = c("create-target", target_params(&o, name)?)?;
                (
                    r,
                    Box::new(|r| println!("Target {} successfully created", cell(r.get("target")))),
                )
            }
            Cmd::ModifyTarget { o, name } => {
                let r = c("modify-target", target_params(&o, Some(name))?)?;
                (
                    r,
                    Box::new(|r| {
                        println!("Target {} successfully modified", cell(r.get("target")))
                    }),
                )
            }
            Cmd::DeleteTarget { force, name } => {
                let r = c("delete-target", json!({"name": name, "force": force}))?;
                (
                    r,
                    Box::new(|r| {
                        println!("Target {} deleted", cell(r.get("target")));
                        let n = r
                            .get("sessions_logged_out")
                            .and_then(Value::as_u64)
                            .unwrap_or(0);
                        if n > 0 {
                            println!("{n} session(s) logged out");
                        }
                    }),
                )
            }
            Cmd::ListTarget { verbose, name } => {
                let r = c("list-target", json!({"name": name}))?;
                (r, Box::new(move |r| list_target(r, verbose)))
            }
            Cmd::CreateTpg {
                tag,
                portals,
                iser,
                iser_only,
            } => {
                let params = json!({"tag": tag, "portals": portals,
                    "iser": iser || iser_only, "tcp": !iser_only});
                let r = c("create-tpg", params)?;
                (r, quiet())
            }
            Cmd::DeleteTpg { tag } => (c("delete-tpg", json!({"tag": tag}))?, quiet()),
            Cmd::ListTpg { verbose, tag } => {
                let r = c("list-tpg", json!({"tag": tag}))?;
                (r, Box::new(move |r| list_tpg(r, verbose)))
            }
            Cmd::CreateInitiator { o, name } => {
                (c("create-initiator", initiator_params(&o, name)?)?, quiet())
            }
            Cmd::ModifyInitiator { o, name } => {
                (c("modify-initiator", initiator_params(&o, name)?)?, quiet())
            }
            Cmd::DeleteInitiator { name } => {
                (c("delete-initiator", json!({"name": name}))?, quiet())
            }
            Cmd::ListInitiator { verbose, name } => {
                let r = c("list-initiator", json!({"name": name}))?;
                (
                    r,
                    Box::new(move |r| {
                        let rows: Vec<Vec<String>> = arr(r)
                            .iter()
                            .map(|i| {
                                let mut row = vec![cell(i.get("name")), "set".into()];
                                if verbose {
                                    row.push(cell(i.get("chap_user")));
                                }
                                row
                            })
                            .collect();
                        if verbose {
                            table(&["INITIATOR NAME", "CHAPSECRET", "CHAPUSER"], &rows)
                        } else {
                            table(&["INITIATOR NAME", "CHAPSECRET"], &rows)
                        }
                    }),
                )
            }
            Cmd::ModifyDefaults {
                auth,
                chap_algorithms,
                isns,
                isns_server,
                metrics_listen,
            } => {
                let mut p = Map::new();
                if let Some(a) = auth {
                    p.insert("auth".into(), json!(a));
                }
                if let Some(a) = chap_algorithms {
                    p.insert(
                        "chap_algorithms".into(),
                        json!(a.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>()),
                    );
                }
                if let Some(i) = isns {
                    p.insert("isns".into(), json!(i == "enable"));
                }
                if let Some(s) = isns_server {
                    p.insert(
                        "isns_servers".into(),
                        json!(s.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>()),
                    );
                }
                if let Some(m) = metrics_listen {
                    p.insert("metrics_listen".into(), json!(m));
                }
                if p.is_empty() {
                    return Err(Failure(
                        "nothing to change: give -a, --chap-algorithms, -i, --isns-server or --metrics-listen".into(),
                    ));
                }
                (c("modify-defaults", Value::Object(p))?, quiet())
            }
            Cmd::ListDefaults => (c("list-defaults", json!({}))?, Box::new(list_defaults)),
            Cmd::ListSession { verbose, target } => {
                let r = c("list-session", json!({"target": target}))?;
                (r, Box::new(move |r| list_session(r, verbose)))
            }
            Cmd::Inspect { target } => {
                (c("inspect", json!({"target": target}))?, Box::new(inspect))
            }
            Cmd::Metrics => (c("metrics", json!({}))?, Box::new(metrics)),
        };
        Ok((result, show))
    })
}

fn list_target(r: &Value, verbose: bool) {
    let row = |t: &Value| {
        vec![
            cell(t.get("name")),
            cell(t.get("operational_status")),
            cell(t.get("sessions")),
        ]
    };
    let header = ["TARGET NAME", "STATE", "SESSIONS"];
    if !verbose {
        table(&header, &arr(r).iter().map(row).collect::<Vec<_>>());
        return;
    }
    for t in arr(r) {
        table(&header, &[row(&t)]);
        let secret = if t.get("chap_secret_set") == Some(&Value::Bool(true)) {
            "set"
        } else {
            "unset"
        };
        detail(
            8,
            &[
                ("alias", cell(t.get("alias"))),
                (
                    "auth",
                    format!(
                        "{} ({})",
                        cell(t.get("auth")),
                        cell(t.get("auth_configured"))
                    ),
                ),
                ("targetchapuser", cell(t.get("chap_user"))),
                ("targetchapsecret", secret.into()),
                ("tpg-tags", cell(t.get("tpgs"))),
                ("initiators", cell(t.get("initiators"))),
                ("luns (all hosts)", cell(t.get("luns_for_all_hosts"))),
                ("I/O", io_line(t.get("counters"))),
            ],
        );
    }
}

fn list_tpg(r: &Value, verbose: bool) {
    let row = |g: &Value| vec![cell(g.get("tag")), cell(g.get("portal_count"))];
    let header = ["TARGET PORTAL GROUP", "PORTAL COUNT"];
    if !verbose {
        table(&header, &arr(r).iter().map(row).collect::<Vec<_>>());
        return;
    }
    for g in arr(r) {
        table(&header, &[row(&g)]);
        detail(
            8,
            &[
                ("portals", cell(g.get("portals"))),
                ("iser", cell(g.get("iser"))),
                ("tcp", cell(g.get("tcp"))),
                ("targets", cell(g.get("targets"))),
            ],
        );
    }
}

fn list_defaults(r: &Value) {
    println!("iSCSI Target Default Properties:");
    println!();
    detail(
        0,
        &[
            ("alias", "-".into()),
            ("auth", cell(r.get("auth"))),
            ("discovery auth", cell(r.get("discovery_auth"))),
            ("chap algorithms", cell(r.get("chap_algorithms"))),
            (
                "isns",
                if r.get("isns") == Some(&Value::Bool(true)) {
                    "enabled".into()
                } else {
                    "disabled".into()
                },
            ),
            ("isns server", cell(r.get("isns_servers"))),
            (
                "isns status",
                r.get("isns_status")
                    .and_then(Value::as_object)
                    .filter(|m| !m.is_empty())
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("?")))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_else(|| "-".into()),
            ),
            ("metrics listener", cell(r.get("metrics_listen"))),
            (
                "max recv data segment",
                cell(r.get("max_recv_data_segment_length")),
            ),
            ("max burst length", cell(r.get("max_burst_length"))),
            ("first burst length", cell(r.get("first_burst_length"))),
            ("queue depth", cell(r.get("queue_depth"))),
            ("max connections", cell(r.get("max_connections"))),
        ],
    );
}

fn list_session(r: &Value, verbose: bool) {
    let rows: Vec<Vec<String>> = arr(r)
        .iter()
        .map(|s| {
            vec![
                cell(s.get("tsih")),
                cell(s.get("isid")),
                cell(s.get("initiator")),
                cell(s.get("target")),
                s.get("connections")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
                    .to_string(),
            ]
        })
        .collect();
    if !verbose {
        table(&["TSIH", "ISID", "INITIATOR", "TARGET", "CONNS"], &rows);
        return;
    }
    for s in arr(r) {
        println!(
            "Session {} (ISID {}): {} -> {}",
            cell(s.get("tsih")),
            cell(s.get("isid")),
            cell(s.get("initiator")),
            cell(s.get("target"))
        );
        detail(
            8,
            &[
                ("state", cell(s.get("state"))),
                ("tpgt", cell(s.get("tpgt"))),
                (
                    "ExpCmdSN/MaxCmdSN",
                    format!(
                        "{}/{}",
                        cell(s.get("exp_cmd_sn")),
                        cell(s.get("max_cmd_sn"))
                    ),
                ),
                ("held by", holders_line(s.get("holders"))),
                ("I/O", io_line(s.get("counters"))),
            ],
        );
        for c in arr_at(&s, "connections") {
            println!(
                "        Connection CID {}: {} -> {}  {}",
                cell(c.get("cid")),
                cell(c.get("peer")),
                cell(c.get("local")),
                cell(c.get("state"))
            );
            println!("            {}", conn_io_line(c.get("counters")));
        }
        println!("        Negotiated parameters:");
        if let Some(Value::Object(p)) = s.get("params") {
            let pairs: Vec<(&str, String)> =
                p.iter().map(|(k, v)| (k.as_str(), cell(Some(v)))).collect();
            detail(12, &pairs);
        }
    }
}

fn print_transitions(indent: usize, t: Option<&Value>) {
    let lines = transitions_lines(t);
    if lines.is_empty() {
        return;
    }
    println!("{:indent$}transitions:", "");
    for l in lines {
        println!("{:indent$}  {l}", "");
    }
}

/// What holds `v`, then its state transitions, both at `indent`.
fn print_holders_and_transitions(v: &Value, indent: usize) {
    println!("{:indent$}held by: {}", "", holders_line(v.get("holders")));
    print_transitions(indent, v.get("transitions"));
}

/// A connection's traffic counters on one line.
fn conn_io_line(k: Option<&Value>) -> String {
    let n = |key: &str| cell(k.and_then(|k| k.get(key)));
    format!(
        "PDUs in/out {}/{}  bytes in/out {}/{}  commands {}",
        n("pdus_in"),
        n("pdus_out"),
        n("bytes_in"),
        n("bytes_out"),
        n("commands")
    )
}

/// A task's ITT as the wire shows it.
fn itt_cell(v: &Value) -> String {
    format!(
        "0x{:08x}",
        v.get("itt").and_then(Value::as_u64).unwrap_or(0)
    )
}

/// A target's or LU's state word: absent means online.
fn online_word(v: &Value) -> &'static str {
    if v.get("online") == Some(&Value::Bool(false)) {
        "OFFLINE"
    } else {
        "online"
    }
}

fn print_session(s: &Value, indent: usize) {
    let pad = |n: usize| " ".repeat(indent + n);
    println!(
        "{}Session TSIH {}  ISID {}  {}  {}  CmdSN {}..{}",
        pad(0),
        cell(s.get("tsih")),
        cell(s.get("isid")),
        cell(s.get("initiator")),
        cell(s.get("state")),
        cell(s.get("exp_cmd_sn")),
        cell(s.get("max_cmd_sn"))
    );
    print_holders_and_transitions(s, indent + 4);
    println!("{}I/O: {}", pad(4), io_line(s.get("counters")));
    println!("{}params: {}", pad(4), pairs_line(s.get("session_params")));
    for l in arr_at(s, "luns") {
        println!(
            "{}LUN {} -> LU {} ({})  {} blocks",
            pad(4),
            cell(l.get("lun")),
            cell(l.get("guid")),
            cell(l.get("alias")),
            cell(l.get("blocks"))
        );
    }
    let held = arr_at(s, "held_commands");
    if !held.is_empty() {
        println!("{}Commands waiting for their CmdSN turn:", pad(4));
        let rows: Vec<Vec<String>> = held
            .iter()
            .map(|h| {
                vec![
                    cell(h.get("cmd_sn")),
                    itt_cell(h),
                    cell(h.get("cid")),
                    cell(h.get("lun")),
                    cell(h.get("command")),
                ]
            })
            .collect();
        table_at(
            indent + 6,
            &["CMDSN", "ITT", "CID", "LUN", "COMMAND"],
            &rows,
        );
    }
    for c in arr_at(s, "connections") {
        println!(
            "{}Connection CID {}  {} -> {}  {}",
            pad(4),
            cell(c.get("cid")),
            cell(c.get("peer")),
            cell(c.get("local")),
            cell(c.get("state"))
        );
        print_holders_and_transitions(&c, indent + 8);
        println!("{}params: {}", pad(8), pairs_line(c.get("params")));
        println!("{}{}", pad(8), conn_io_line(c.get("counters")));
        let tasks = arr_at(&c, "tasks");
        println!("{}Tasks in flight: {}", pad(8), tasks.len());
        let rows: Vec<Vec<String>> = tasks
            .iter()
            .map(|t| {
                vec![
                    itt_cell(t),
                    cell(t.get("cmd_sn")),
                    cell(t.get("lun")),
                    cell(t.get("command")),
                    cell(t.get("direction")),
                    format!(
                        "{}/{}",
                        cell(t.get("bytes_done")),
                        cell(t.get("bytes_expected"))
                    ),
                    format!("{}us", cell(t.get("age_us"))),
                    cell(t.get("state")),
                ]
            })
            .collect();
        if !rows.is_empty() {
            table_at(
                indent + 10,
                &[
                    "ITT",
                    "CMDSN",
                    "LUN",
                    "COMMAND",
                    "DIR",
                    "DONE/EXPECTED",
                    "AGE",
                    "STATE",
                ],
                &rows,
            );
        }
    }
}

fn inspect(r: &Value) {
    println!("Model generation {}", cell(r.get("generation")));
    let iser = r.get("iser");
    println!(
        "iSER registered memory: {} regions, {} bytes",
        cell(iser.and_then(|i| i.get("regions"))),
        cell(iser.and_then(|i| i.get("registered_bytes")))
    );
    for t in arr_at(r, "targets") {
        println!(
            "Target {}  ({})  {}  auth={}  sessions={}",
            cell(t.get("target")),
            cell(t.get("alias")),
            online_word(&t),
            cell(t.get("auth")),
            cell(t.get("sessions"))
        );
        println!("    held by: {}", holders_line(t.get("holders")));
        println!("    I/O: {}", io_line(t.get("counters")));
        for g in arr_at(&t, "tpgs") {
            println!(
                "    TPG {}  portals {}",
                cell(g.get("tag")),
                cell(g.get("portals"))
            );
            for s in arr_at(&g, "sessions") {
                print_session(&s, 8);
            }
        }
    }
    let ds = arr_at(r, "discovery_sessions");
    if !ds.is_empty() {
        println!("Discovery sessions");
        for s in ds {
            print_session(&s, 4);
        }
    }
    for l in arr_at(r, "lus") {
        println!(
            "LU {}  ({})  {}  {} bytes",
            cell(l.get("guid")),
            cell(l.get("alias")),
            online_word(&l),
            cell(l.get("size"))
        );
        println!("    held by: {}", holders_line(l.get("holders")));
        println!("    I/O: {}", io_line(l.get("counters")));
    }
}

fn metrics(r: &Value) {
    let row = |scope: &str, name: String, c: Option<&Value>| {
        let n = |k: &str| cell(c.and_then(|c| c.get(k)));
        let lat = |k: &str| cell(c.and_then(|c| c.get("latency")).and_then(|l| l.get(k)));
        vec![
            scope.to_string(),
            name,
            n("commands"),
            n("bytes_read"),
            n("bytes_written"),
            n("check_conditions"),
            n("task_aborts"),
            lat("avg_us"),
            lat("p99_le_us"),
        ]
    };
    let mut rows = Vec::new();
    for t in arr_at(r, "targets") {
        rows.push(row("target", cell(t.get("target")), t.get("counters")));
    }
    for l in arr_at(r, "lus") {
        rows.push(row("lu", cell(l.get("guid")), l.get("counters")));
    }
    for s in arr_at(r, "sessions") {
        rows.push(row(
            "session",
            format!("{} {}", cell(s.get("tsih")), cell(s.get("initiator"))),
            s.get("counters"),
        ));
    }
    table(
        &[
            "SCOPE",
            "NAME",
            "CMDS",
            "READ B",
            "WRITTEN B",
            "CHECK COND",
            "ABORTS",
            "AVG US",
            "P99 <= US",
        ],
        &rows,
    );
}
