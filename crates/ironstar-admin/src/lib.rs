//! # ironstar-admin — `itadm` and `stmfadm`
//!
//! Thin clients of iscsitd's JSON-RPC 2.0 API (Unix socket; see
//! `ARCHITECTURE.md`, "Daemon ↔ tools"): each verb is one request; the
//! answer is printed as a table like COMSTAR's, or as JSON with `--json`.
//! Errors are one readable line and a non-zero exit. [`cli`] holds the
//! scaffolding both tools share.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{json, Value};

pub mod cli;

pub const DEFAULT_SOCKET: &str = "/run/ironstar/iscsitd.sock";

/// A failed call, ready to print.
#[derive(Debug)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Sends one request and returns its result.
pub fn call(socket: &Path, method: &str, params: Value) -> Result<Value, Failure> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        Failure(format!(
            "cannot reach iscsitd at {}: {e} (is it running? see --socket)",
            socket.display()
        ))
    })?;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let mut w = &stream;
    w.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| Failure(format!("cannot send to iscsitd: {e}")))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| Failure(format!("no answer from iscsitd: {e}")))?;
    let answer: Value = serde_json::from_str(&line)
        .map_err(|_| Failure("iscsitd answered something that is not JSON-RPC".into()))?;
    if let Some(err) = answer.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("error");
        return Err(Failure(msg.to_string()));
    }
    Ok(answer.get("result").cloned().unwrap_or(Value::Null))
}

/// Runs a CLI body: prints its error on one line, exits non-zero.
pub fn run(prog: &str, body: impl FnOnce() -> Result<(), Failure>) -> std::process::ExitCode {
    match body() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prog}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints `v` as pretty JSON.
pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A value as a table cell: strings bare, null as "-".
pub fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| cell(Some(x)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// Prints rows under a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    table_at(0, header, rows)
}

/// [`table`], indented by `indent` spaces.
pub fn table_at(indent: usize, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                s.push_str(&c);
            } else {
                s.push_str(&format!(
                    "{c:<width$}  ",
                    width = w.get(i).copied().unwrap_or(0)
                ));
            }
        }
        println!("{:indent$}{}", "", s.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// `key: value` lines under an item, aligned like COMSTAR's verbose lists.
pub fn detail(indent: usize, pairs: &[(&str, String)]) {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in pairs {
        println!("{:indent$}{k:<w$} : {v}", "");
    }
}

/// Reads a CHAP secret: from `file` (first line), else from a prompt
/// (twice, echo off on a terminal).
pub fn read_secret(file: Option<&Path>) -> Result<String, Failure> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Failure(format!("cannot read {}: {e}", f.display())))?;
        let s = text.lines().next().unwrap_or("").to_string();
        return check_secret(s);
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let echo = |on: bool| {
        if tty {
            let _ = std::process::Command::new("stty")
                .arg(if on { "echo" } else { "-echo" })
                .stdin(std::process::Stdio::inherit())
                .status();
        }
    };
    let ask = |prompt: &str| -> Result<String, Failure> {
        eprint!("{prompt}");
        echo(false);
        let mut s = String::new();
        let r = std::io::stdin().read_line(&mut s);
        echo(true);
        if tty {
            eprintln!();
        }
        r.map_err(|e| Failure(format!("cannot read the secret: {e}")))?;
        Ok(s.trim_end_matches(['\n', '\r']).to_string())
    };
    let first = ask("Enter CHAP secret: ")?;
    if tty {
        let again = ask("Re-enter secret: ")?;
        if again != first {
            return Err(Failure("the secrets do not match".into()));
        }
    }
    check_secret(first)
}

fn check_secret(s: String) -> Result<String, Failure> {
    if !(12..=255).contains(&s.len()) {
        return Err(Failure("a CHAP secret is 12 to 255 characters".into()));
    }
    Ok(s)
}

/// "1,2,3" → [1, 2, 3].
pub fn tag_list(s: &str) -> Result<Vec<u64>, Failure> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<u64>()
                .map_err(|_| Failure(format!("{x:?} is not a TPG tag (1..65535)")))
        })
        .collect()
}

/// Bytes as COMSTAR prints them: "1073741824" → "1.0G".
pub fn human_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (u, m) in UNITS {
        if n >= m {
            return format!("{:.1}{u}", n as f64 / m as f64);
        }
    }
    format!("{n}")
}

/// The counters object of the API (`counters`) on one line.
pub fn io_line(c: Option<&Value>) -> String {
    let Some(c) = c else {
        return "-".into();
    };
    let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
    let lat = c.get("latency");
    let le = |k: &str| {
        lat.and_then(|l| l.get(k))
            .and_then(Value::as_u64)
            .map_or("-".to_string(), |us| format!("<={us}us"))
    };
    format!(
        "cmds {} (r {} / w {})  read {}  written {}  check-conditions {}  other errors {}  aborts {}  latency avg {} p50 {} p99 {}",
        n("commands"),
        n("read_commands"),
        n("write_commands"),
        human_size(n("bytes_read")),
        human_size(n("bytes_written")),
        n("check_conditions"),
        n("other_errors"),
        n("task_aborts"),
        lat.and_then(|l| l.get("avg_us"))
            .and_then(Value::as_u64)
            .map_or("-".to_string(), |us| format!("{us}us")),
        le("p50_le_us"),
        le("p99_le_us"),
    )
}

/// "x3 session table, x1 this inspection" from a `holders` list.
pub fn holders_line(h: Option<&Value>) -> String {
    let items: Vec<String> = h
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| {
                    let n = x.get("refs").or_else(|| x.get("count"));
                    format!("{} x{}", cell(x.get("holder")), cell(n))
                })
                .collect()
        })
        .unwrap_or_default();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// A state machine's recent transitions, newest last, with their age.
pub fn transitions_lines(t: Option<&Value>) -> Vec<String> {
    t.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| {
                    let ago = x.get("ago_ms").and_then(Value::as_u64).unwrap_or(0);
                    format!(
                        "-{}.{:03}s  {} --{}--> {}",
                        ago / 1000,
                        ago % 1000,
                        cell(x.get("from")),
                        cell(x.get("event")),
                        cell(x.get("to"))
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `k=v` pairs of an object on one line.
pub fn pairs_line(o: Option<&Value>) -> String {
    match o {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(Some(v))))
            .collect::<Vec<_>>()
            .join(" "),
        _ => "-".into(),
    }
}
