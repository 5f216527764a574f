//! stmfadm: the SCSI side of Ironstar — logical units, host groups,
//! target groups and the views that decide who sees which LU at which LUN.

use clap::{Parser, Subcommand};
use ironstar_admin::cli::{arr, arr_at, quiet, run_verb, Global, Show};
use ironstar_admin::{cell, detail, human_size, io_line, Failure};
use serde_json::{json, Map, Value};

#[derive(Parser)]
#[command(
    name = "stmfadm",
    version,
    about = "Administer Ironstar's logical units, host groups, target groups and views",
    after_help = "Examples:\n  stmfadm create-lu -s 10G -p alias=db /srv/lu/db.img\n  stmfadm create-lu -s 1G memory\n  stmfadm create-lu -p conf=/etc/ceph/ceph.conf -p id=admin rbd:rbd/lu0\n  stmfadm create-hg web && stmfadm add-hg-member -g web iqn.1994-05.com.example:web1\n  stmfadm add-view -h web -n 3 db\n  stmfadm list-view -l db\n  stmfadm modify-lu -s 20G db      # initiators get CAPACITY DATA HAS CHANGED\n  stmfadm list-lu -v"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Register a logical unit on a file or block device, or in memory.
    CreateLu {
        /// Property name=value: alias, blk, guid, serial, vid, pid, wcd, wp, thin;
        /// for a file or device: also direct (true: O_DIRECT, bypass the page cache)
        /// and io_threads (I/Os at once, 1..1024; default: the device's queue, 16 for a file);
        /// for rbd: also conf (the cluster's ceph.conf) and id (cephx client id).
        #[arg(short = 'p', long = "lu-prop", value_name = "NAME=VALUE")]
        props: Vec<String>,
        /// Size (e.g. 10G); creates the file if it does not exist.
        #[arg(short, long)]
        size: Option<String>,
        /// A file or device path, "memory", "null", or rbd:POOL/IMAGE (a Ceph RBD image).
        path: String,
    },
    /// Grow a logical unit (initiators get a capacity-changed unit attention) or set its alias.
    ModifyLu {
        #[arg(short = 'p', long = "lu-prop", value_name = "NAME=VALUE")]
        props: Vec<String>,
        #[arg(short, long)]
        size: Option<String>,
        /// GUID or alias.
        lu: String,
    },
    /// Delete a logical unit and its views (a file LU's data and identity stay for import-lu).
    DeleteLu { lu: String },
    /// Register a file LU again with the identity (GUID, size, block size,
    /// serial, alias, ...) kept beside its data in PATH.ironstar-lu.
    #[command(
        after_help = "Examples:\n  stmfadm delete-lu db && stmfadm import-lu /srv/lu/db.img\n  stmfadm import-lu -m /etc/ironstar/sdb.ironstar-lu /dev/sdb"
    )]
    ImportLu {
        /// The metadata file (default: PATH.ironstar-lu).
        #[arg(short = 'm', long = "meta", value_name = "FILE")]
        meta: Option<String>,
        /// The LU's data file (or device).
        path: String,
    },
    /// List logical units.
    ListLu {
        #[arg(short, long)]
        verbose: bool,
        lu: Option<String>,
    },
    /// Bring a logical unit online (its views show it again).
    OnlineLu { lu: String },
    /// Take a logical unit offline (no view shows it).
    OfflineLu { lu: String },
    /// Create a host group.
    CreateHg { name: String },
    /// Delete a host group (refused while a view uses it).
    DeleteHg { name: String },
    /// Add initiators to a host group.
    AddHgMember {
        #[arg(short = 'g', long = "group-name")]
        group: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove initiators from a host group.
    RemoveHgMember {
        #[arg(short = 'g', long = "group-name")]
        group: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// List host groups.
    ListHg {
        #[arg(short, long)]
        verbose: bool,
        name: Option<String>,
    },
    /// Create a target group.
    CreateTg { name: String },
    /// Delete a target group (refused while a view uses it).
    DeleteTg { name: String },
    /// Add targets to a target group.
    AddTgMember {
        #[arg(short = 'g', long = "group-name")]
        group: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove targets from a target group.
    RemoveTgMember {
        #[arg(short = 'g', long = "group-name")]
        group: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// List target groups.
    ListTg {
        #[arg(short, long)]
        verbose: bool,
        name: Option<String>,
    },
    /// Show a logical unit to a host group through a target group at a LUN.
    #[command(disable_help_flag = true)]
    AddView {
        /// Print help.
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
        /// Host group (default: all initiators).
        #[arg(short = 'h', long = "host-group")]
        host_group: Option<String>,
        /// Target group (default: all targets).
        #[arg(short = 't', long = "target-group")]
        target_group: Option<String>,
        /// LUN (default: the lowest free one).
        #[arg(short = 'n', long = "lun")]
        lun: Option<u64>,
        lu: String,
    },
    /// Remove view entries of a logical unit (their numbers from list-view), or all (-a).
    RemoveView {
        #[arg(short = 'l', long = "lu-name")]
        lu: String,
        #[arg(short, long)]
        all: bool,
        entries: Vec<u64>,
    },
    /// List the view entries of a logical unit.
    ListView {
        #[arg(short = 'l', long = "lu-name")]
        lu: String,
    },
    /// List targets (their state and sessions).
    ListTarget {
        #[arg(short, long)]
        verbose: bool,
    },
    /// Bring a target online: it accepts logins and is discovered again.
    OnlineTarget { target: String },
    /// Take a target offline: its sessions are logged out, logins refused.
    OfflineTarget { target: String },
    /// The state of the SCSI target framework.
    ListState,
}

fn props(list: &[String]) -> Result<Value, Failure> {
    let mut m = Map::new();
    for p in list {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| Failure(format!("property {p:?} is not name=value")))?;
        m.insert(k.trim().to_string(), json!(v.trim()));
    }
    Ok(Value::Object(m))
}

fn main() -> std::process::ExitCode {
    // -h is add-view's host group, as in COMSTAR; --help still works.
    let cli = Cli::parse();
    run_verb("stmfadm", &cli.global, |c| {
        let (result, show): (Value, Show) = match cli.cmd {
            Cmd::CreateLu {
                props: p,
                size,
                path,
            } => {
                let path = if path == "memory" || path == "null" || path.starts_with("rbd:") {
                    path
                } else {
                    std::path::absolute(&path)
                        .map_err(|e| Failure(format!("{path}: {e}")))?
                        .to_string_lossy()
                        .into_owned()
                };
                let r = c(
                    "create-lu",
                    json!({"path": path, "size": size, "props": props(&p)?}),
                )?;
                (
                    r,
                    Box::new(|r| println!("Logical unit created: {}", cell(r.get("guid")))),
                )
            }
            Cmd::ModifyLu { props: p, size, lu } => {
                if size.is_none() && p.is_empty() {
                    return Err(Failure(
                        "nothing to change: give -s SIZE or -p alias=NAME".into(),
                    ));
                }
                (
                    c(
                        "modify-lu",
                        json!({"lu": lu, "size": size, "props": props(&p)?}),
                    )?,
                    quiet(),
                )
            }
            Cmd::DeleteLu { lu } => (c("delete-lu", json!({"lu": lu}))?, quiet()),
            Cmd::ImportLu { meta, path } => {
                let abs = |p: &str| {
                    std::path::absolute(p)
                        .map(|a| a.to_string_lossy().into_owned())
                        .map_err(|e| Failure(format!("{p}: {e}")))
                };
                let meta = meta.as_deref().map(abs).transpose()?;
                let r = c("import-lu", json!({"path": abs(&path)?, "meta": meta}))?;
                (
                    r,
                    Box::new(|r| println!("Logical unit imported: {}", cell(r.get("guid")))),
                )
            }
            Cmd::ListLu { verbose, lu } => {
                let r = c("list-lu", json!({"lu": lu}))?;
                (r, Box::new(move |r| list_lu(r, verbose)))
            }
            Cmd::OnlineLu { lu } => (c("online-lu", json!({"lu": lu}))?, quiet()),
            Cmd::OfflineLu { lu } => (c("offline-lu", json!({"lu": lu}))?, quiet()),
            Cmd::CreateHg { name } => (c("create-hg", json!({"name": name}))?, quiet()),
            Cmd::DeleteHg { name } => (c("delete-hg", json!({"name": name}))?, quiet()),
            Cmd::AddHgMember { group, members } => (
                c("add-hg-member", json!({"name": group, "members": members}))?,
                quiet(),
            ),
            Cmd::RemoveHgMember { group, members } => (
                c(
                    "remove-hg-member",
                    json!({"name": group, "members": members}),
                )?,
                quiet(),
            ),
            Cmd::ListHg { verbose, name } => {
                let r = c("list-hg", json!({"name": name}))?;
                (r, Box::new(move |r| list_groups(r, "Host Group", verbose)))
            }
            Cmd::CreateTg { name } => (c("create-tg", json!({"name": name}))?, quiet()),
            Cmd::DeleteTg { name } => (c("delete-tg", json!({"name": name}))?, quiet()),
            Cmd::AddTgMember { group, members } => (
                c("add-tg-member", json!({"name": group, "members": members}))?,
                quiet(),
            ),
            Cmd::RemoveTgMember { group, members } => (
                c(
                    "remove-tg-member",
                    json!({"name": group, "members": members}),
                )?,
                quiet(),
            ),
            Cmd::ListTg { verbose, name } => {
                let r = c("list-tg", json!({"name": name}))?;
                (
                    r,
                    Box::new(move |r| list_groups(r, "Target Group", verbose)),
                )
            }
            Cmd::AddView {
                host_group,
                target_group,
                lun,
                lu,
                ..
            } => {
                let r = c(
                    "add-view",
                    json!({"lu": lu, "host_group": host_group, "target_group": target_group, "lun": lun}),
                )?;
                (r, quiet())
            }
            Cmd::RemoveView { lu, all, entries } => {
                let entries = (!all).then_some(entries);
                (
                    c(
                        "remove-view",
                        json!({"lu": lu, "all": all, "entries": entries}),
                    )?,
                    quiet(),
                )
            }
            Cmd::ListView { lu } => (c("list-view", json!({"lu": lu}))?, Box::new(list_view)),
            Cmd::ListTarget { verbose } => {
                let r = c("list-target", json!({}))?;
                (
                    r,
                    Box::new(move |r| {
                        for t in arr(r) {
                            println!("Target: {}", cell(t.get("name")));
                            if verbose {
                                detail(
                                    4,
                                    &[
                                        ("Operational Status", cell(t.get("operational_status"))),
                                        ("Provider Name", "iscsit".into()),
                                        ("Alias", cell(t.get("alias"))),
                                        ("Protocol", "iSCSI".into()),
                                        ("Sessions", cell(t.get("sessions"))),
                                    ],
                                );
                                for i in arr_at(&t, "initiators") {
                                    println!("        Initiator: {}", cell(Some(&i)));
                                }
                            }
                        }
                    }),
                )
            }
            Cmd::OnlineTarget { target } => (c("online-target", json!({"name": target}))?, quiet()),
            Cmd::OfflineTarget { target } => (
                c("offline-target", json!({"name": target}))?,
                Box::new(|r| {
                    let n = r
                        .get("sessions_logged_out")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    if n > 0 {
                        println!("{n} session(s) logged out");
                    }
                }),
            ),
            Cmd::ListState => (
                c("list-state", json!({}))?,
                Box::new(|r| {
                    detail(
                        0,
                        &[
                            ("Operational Status", cell(r.get("operational_status"))),
                            ("Config Status", cell(r.get("config_status"))),
                            ("Config File", cell(r.get("config_path"))),
                        ],
                    );
                }),
            ),
        };
        Ok((result, show))
    })
}

fn list_lu(r: &Value, verbose: bool) {
    for l in arr(r) {
        println!("LU Name: {}", cell(l.get("guid")));
        if !verbose {
            continue;
        }
        let size = l.get("size").and_then(Value::as_u64).unwrap_or(0);
        let s = l.get("stats").cloned().unwrap_or(Value::Null);
        let yes = |k: &str| {
            if l.get(k) == Some(&Value::Bool(true)) {
                "Enabled"
            } else {
                "Disabled"
            }
        };
        detail(
            4,
            &[
                ("Operational Status", cell(l.get("operational_status"))),
                ("Provider Name", "sbd".into()),
                ("Alias", cell(l.get("alias"))),
                ("View Entry Count", cell(l.get("view_entries"))),
                ("Data File", cell(l.get("data_file"))),
                ("Size", format!("{size} ({})", human_size(size))),
                ("Block Size", cell(l.get("block_size"))),
                ("Vendor ID", cell(l.get("vendor_id"))),
                ("Product ID", cell(l.get("product_id"))),
                ("Serial Num", cell(l.get("serial"))),
                ("Write Protect", yes("write_protect").into()),
                (
                    "Writeback Cache",
                    if l.get("write_cache_disabled") == Some(&Value::Bool(true)) {
                        "Disabled".into()
                    } else {
                        "Enabled".into()
                    },
                ),
                ("Thin Provisioning", yes("thin").into()),
                ("Access State", "Active".into()),
                ("Session references", cell(l.get("refs"))),
                (
                    "Commands (r/w/other)",
                    format!(
                        "{}/{}/{}",
                        cell(s.get("read_commands")),
                        cell(s.get("write_commands")),
                        cell(s.get("other_commands"))
                    ),
                ),
                (
                    "Bytes (read/written)",
                    format!(
                        "{}/{}",
                        cell(s.get("read_bytes")),
                        cell(s.get("write_bytes"))
                    ),
                ),
                ("Errors", cell(s.get("errors"))),
                ("I/O (port)", io_line(l.get("counters"))),
            ],
        );
    }
}

fn list_groups(r: &Value, label: &str, verbose: bool) {
    for g in arr(r) {
        println!("{label}: {}", cell(g.get("name")));
        if verbose {
            for m in arr_at(&g, "members") {
                println!("        Member: {}", cell(Some(&m)));
            }
        }
    }
}

fn list_view(r: &Value) {
    for v in arr(r) {
        println!("View Entry: {}", cell(v.get("entry")));
        detail(
            4,
            &[
                ("Host group", cell(v.get("host_group"))),
                ("Target group", cell(v.get("target_group"))),
                ("LUN", cell(v.get("lun"))),
            ],
        );
    }
}
