//! The observability endpoint: `/metrics` (Prometheus text), `/healthz` (the pipeline's threads are alive) and
//! `/readyz` (model loaded, broker connected, at least one camera delivering frames). Bound to 127.0.0.1 by
//! default. A deliberately tiny HTTP/1.1 responder: three GET routes do not justify a web framework.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::metrics;

/// A camera thread that has not turned its loop for this long is wedged.
pub const WEDGED_AFTER: Duration = Duration::from_secs(30);

/// Every camera thread is alive (not wedged in detection, inference or GStreamer), and so is the inference thread.
pub fn healthy() -> Result<(), String> {
    let mut wedged: Vec<String> = metrics()
        .cameras()
        .into_iter()
        .filter(|(_, s)| s.since_beat() > WEDGED_AFTER)
        .map(|(id, s)| {
            format!(
                "camera {id} silent for {:.0} s",
                s.since_beat().as_secs_f32()
            )
        })
        .collect();
    if metrics().inference_failed.load(Ordering::Relaxed) {
        wedged.push("the inference thread has died".into());
    }
    if wedged.is_empty() {
        Ok(())
    } else {
        Err(wedged.join("; "))
    }
}

/// The daemon does its job: model loaded, broker connected, at least one camera delivering frames.
pub fn ready() -> Result<(), String> {
    let m = metrics();
    let mut missing = Vec::new();
    if !m.model_loaded.load(Ordering::Relaxed) {
        missing.push("model not loaded");
    }
    if !m.mqtt_connected.load(Ordering::Relaxed) {
        missing.push("MQTT broker not connected");
    }
    if !m
        .cameras()
        .iter()
        .any(|(_, s)| s.online.load(Ordering::Relaxed))
    {
        missing.push("no camera delivering frames");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

/// Binds `addr` (so a bad address fails at start-up, not later).
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let (mut stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("The metrics endpoint could not accept a connection: {e}.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            // Read until the end of the headers: a request may arrive in several TCP segments.
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let complete = tokio::time::timeout(Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(complete, Ok(true)) {
                return;
            }
            let request = String::from_utf8_lossy(&buf);
            let mut words = request.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (code, ctype, body) = route(method, path);
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                _ => "Service Unavailable",
            };
            let head = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            if method != "HEAD" {
                let _ = stream.write_all(body.as_bytes()).await;
            }
            let _ = stream.shutdown().await;
        });
    }
}

fn route(method: &str, path: &str) -> (u16, &'static str, String) {
    if method != "GET" && method != "HEAD" {
        return (405, "text/plain", "only GET\n".into());
    }
    let text = "text/plain; charset=utf-8";
    let check = |r: Result<(), String>| match r {
        Ok(()) => (200, text, "ok\n".to_owned()),
        Err(e) => (503, text, format!("{e}\n")),
    };
    match path.split('?').next().unwrap_or("") {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics().render(),
        ),
        "/healthz" => check(healthy()),
        "/readyz" => check(ready()),
        _ => (404, text, "try /metrics, /healthz or /readyz\n".into()),
    }
}
