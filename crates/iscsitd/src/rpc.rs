//! JSON-RPC 2.0 over a Unix socket: one request (or batch) per line, one
//! answer per line. Malformed input gets a JSON-RPC error; a client can
//! never bring the daemon down.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::admin::Admin;

/// Longest request line accepted.
const MAX_LINE: u64 = 4 << 20;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// A refused change or a failed operation (the message says why).
pub const REFUSED: i64 = -32000;

/// An error answer.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn refused(message: impl Into<String>) -> Self {
        RpcError {
            code: REFUSED,
            message: message.into(),
        }
    }
    pub fn params(message: impl Into<String>) -> Self {
        RpcError {
            code: INVALID_PARAMS,
            message: message.into(),
        }
    }
}

/// Binds the socket (mode 0600), replacing a stale one left by a crash.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!("{} is in use: is another iscsitd running?", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, admin: Arc<Admin>, path: PathBuf) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(client(stream, admin.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, socket = %path.display(), "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn client(stream: UnixStream, admin: Arc<Admin>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = Vec::new();
        match (&mut r)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.len() as u64 > MAX_LINE {
            Some(error(
                Value::Null,
                INVALID_REQUEST,
                "request longer than 4 MiB",
            ))
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            handle_text(&admin, &line).await
        };
        if let Some(a) = answer {
            let mut text = a.to_string();
            text.push('\n');
            if w.write_all(text.as_bytes()).await.is_err() {
                return;
            }
        }
        if line.len() as u64 > MAX_LINE {
            return;
        }
    }
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// Answers one line: a request, a notification (no answer) or a batch.
pub async fn handle_text(admin: &Admin, text: &[u8]) -> Option<Value> {
    let v: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            return Some(error(
                Value::Null,
                PARSE_ERROR,
                &format!("parse error: {e}"),
            ))
        }
    };
    match v {
        Value::Array(items) if items.is_empty() => {
            Some(error(Value::Null, INVALID_REQUEST, "empty batch"))
        }
        Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                if let Some(a) = handle_one(admin, item).await {
                    out.push(a);
                }
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
        other => handle_one(admin, other).await,
    }
}

async fn handle_one(admin: &Admin, v: Value) -> Option<Value> {
    let Value::Object(mut req) = v else {
        return Some(error(
            Value::Null,
            INVALID_REQUEST,
            "a request is an object",
        ));
    };
    let id = req.remove("id");
    let id_ok = matches!(
        id,
        None | Some(Value::Null) | Some(Value::Number(_)) | Some(Value::String(_))
    );
    let reply_id = id.clone().unwrap_or(Value::Null);
    if req.get("jsonrpc").and_then(Value::as_str) != Some("2.0") || !id_ok {
        return Some(error(
            reply_id,
            INVALID_REQUEST,
            "not a JSON-RPC 2.0 request",
        ));
    }
    let Some(Value::String(method)) = req.remove("method") else {
        return Some(error(reply_id, INVALID_REQUEST, "method must be a string"));
    };
    let params = match req.remove("params") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return Some(error(reply_id, INVALID_PARAMS, "params must be an object"));
        }
    };
    let result = admin.call(&method, &params).await;
    // A notification gets no answer, whatever happened.
    id.as_ref()?;
    Some(match result {
        Ok(r) => json!({"jsonrpc": "2.0", "id": reply_id, "result": r}),
        Err(e) => {
            tracing::info!(method, error = %e.message, "request refused");
            error(reply_id, e.code, &e.message)
        }
    })
}
