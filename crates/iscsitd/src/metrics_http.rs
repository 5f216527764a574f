//! The optional Prometheus endpoint: a tiny HTTP/1.x responder on a
//! loopback address (`[metrics] listen = "127.0.0.1:9283"`), off unless
//! configured. It answers `GET /metrics` with the text exposition and
//! closes the connection; nothing else (no keep-alive, no chunking), so it
//! needs no HTTP crate. Requests are bounded in size and time.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iscsi_target::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Longest request head accepted.
const MAX_REQUEST: usize = 8 << 10;
/// A client gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The running listener (at most one), replaced when the setting changes.
#[derive(Default)]
pub struct Listener {
    running: Mutex<Option<(SocketAddr, JoinHandle<()>)>>,
}

impl Listener {
    /// Where it listens now.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.running
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|(a, _)| *a))
    }

    /// Binds `want` (if it is not what runs already) without starting it,
    /// so a change can be refused before it is written.
    pub async fn prepare(&self, want: Option<SocketAddr>) -> Result<Option<TcpListener>, String> {
        match want {
            None => Ok(None),
            Some(a) if self.addr() == Some(a) => Ok(None),
            Some(a) => TcpListener::bind(a)
                .await
                .map(Some)
                .map_err(|e| format!("cannot listen for metrics on {a}: {e}")),
        }
    }

    /// Makes `want` the serving address: starts `bound` (from [`prepare`])
    /// or stops the listener when `want` is None.
    pub fn apply(
        &self,
        want: Option<SocketAddr>,
        bound: Option<TcpListener>,
        registry: Arc<Registry>,
    ) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        if running.as_ref().map(|(a, _)| *a) == want && bound.is_none() {
            return;
        }
        if let Some((a, task)) = running.take() {
            tracing::info!(addr = %a, "metrics listener stopped");
            task.abort();
        }
        if let (Some(a), Some(l)) = (want, bound) {
            let addr = l.local_addr().unwrap_or(a);
            tracing::info!(addr = %addr, "metrics listener ready (GET /metrics)");
            *running = Some((a, tokio::spawn(serve(l, registry))));
        }
    }

    pub fn stop(&self) {
        if let Ok(mut r) = self.running.lock() {
            if let Some((_, t)) = r.take() {
                t.abort();
            }
        }
    }
}

async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, registry.clone()));
            }
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics,
    NotFound,
    BadMethod,
    Bad,
}

fn parse_head(head: &[u8]) -> Ask {
    let Some(line) = head.split(|b| *b == b'\n').next() else {
        return Ask::Bad;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ask::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Ask::Bad;
    }
    if method != "GET" && method != "HEAD" {
        return Ask::BadMethod;
    }
    let path = target.split('?').next().unwrap_or("");
    if path == "/metrics" || path == "/" {
        Ask::Metrics
    } else {
        Ask::NotFound
    }
}

async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return (!buf.is_empty()).then_some(buf);
        }
        buf.extend_from_slice(chunk.get(..n)?);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Some(buf);
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
    }
}

async fn answer(mut stream: TcpStream, registry: Arc<Registry>) {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(h)) => h,
        _ => return,
    };
    let head_only = head.starts_with(b"HEAD ");
    let (status, ctype, body) = match parse_head(&head) {
        Ask::Metrics => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            crate::inspect::prometheus(&registry),
        ),
        Ask::NotFound => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        Ask::BadMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
        Ask::Bad => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&out)).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_sorted_out() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ask::Metrics
        );
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Ask::Metrics
        );
        assert_eq!(parse_head(b"GET /nope HTTP/1.1\r\n\r\n"), Ask::NotFound);
        assert_eq!(
            parse_head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Ask::BadMethod
        );
        assert_eq!(parse_head(b"\x00\xff garbage"), Ask::Bad);
        assert_eq!(parse_head(b""), Ask::Bad);
    }
}
