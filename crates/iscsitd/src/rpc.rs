//! JSON-RPC 2.0 over a Unix socket: one request (or batch) per line, one
//! answer per line. Malformed input gets a JSON-RPC error ([`jsonrpc`]
//! parses); a client can never bring the daemon down, and one that sends
//! nothing is dropped after a while.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::admin::Admin;
use crate::jsonrpc::{self, Item, Parsed};

/// Longest request line accepted.
const MAX_LINE: u64 = 4 << 20;
/// A client that sends no whole request for this long is disconnected, so
/// idle connections cannot pile up.
const IDLE: std::time::Duration = std::time::Duration::from_secs(300);

pub use crate::jsonrpc::{INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, REFUSED};

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
                if let Some(refusal) = refuse_peer(&stream) {
                    tokio::spawn(refuse(stream, refusal));
                    continue;
                }
                tokio::spawn(client(stream, admin.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, socket = %path.display(), "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Only root and the daemon's own user administer it, whatever the socket's
/// file mode says (a chmod by mistake must not open the daemon to everyone).
fn refuse_peer(stream: &UnixStream) -> Option<String> {
    let own = own_uid();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 || cred.uid() == own => None,
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), "administration refused: not root");
            Some(format!(
                "uid {} may not administer iscsitd (root or uid {own} only)",
                cred.uid()
            ))
        }
        Err(e) => Some(format!("cannot tell who is connecting: {e}")),
    }
}

/// The daemon's effective uid.
fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Answers the refused client's first request with the reason (reading it
/// first, so the client is not cut off mid-write and sees the message).
async fn refuse(stream: UnixStream, why: String) {
    let (r, mut w) = stream.into_split();
    let mut first = Vec::new();
    let mut limited = BufReader::new(r).take(64 * 1024);
    let read = limited.read_until(b'\n', &mut first);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
    let mut text = jsonrpc::error(Value::Null, INVALID_REQUEST, &why).to_string();
    text.push('\n');
    let _ = w.write_all(text.as_bytes()).await;
}

async fn client(stream: UnixStream, admin: Arc<Admin>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = Vec::new();
        let mut limited = (&mut r).take(MAX_LINE + 1);
        let read = limited.read_until(b'\n', &mut line);
        match tokio::time::timeout(IDLE, read).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                tracing::debug!("administration client idle too long: disconnected");
                return;
            }
        }
        let too_long = line.len() as u64 > MAX_LINE;
        let answer = if too_long {
            Some(jsonrpc::error(
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
        if too_long {
            // The rest of that line is still coming: no way to resync.
            return;
        }
    }
}

/// Answers one line: a request, a notification (no answer) or a batch.
pub async fn handle_text(admin: &Admin, text: &[u8]) -> Option<Value> {
    match jsonrpc::parse(text) {
        Parsed::One(item) => handle_item(admin, item).await,
        Parsed::Batch(items) => {
            let mut out = Vec::new();
            for item in items {
                if let Some(a) = handle_item(admin, item).await {
                    out.push(a);
                }
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
    }
}

async fn handle_item(admin: &Admin, item: Item) -> Option<Value> {
    let call = match item {
        Item::Invalid(answer) => return Some(answer),
        Item::Call(c) => c,
    };
    let result = admin.call(&call.method, &call.params).await;
    // A notification gets no answer, whatever happened.
    let id = call.id?;
    Some(match result {
        Ok(r) => jsonrpc::result(id, r),
        Err(e) => {
            tracing::info!(method = call.method, error = %e.message, "request refused");
            jsonrpc::error(id, e.code, &e.message)
        }
    })
}
