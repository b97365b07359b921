//! The metrics endpoint of guestwatch's daemons: Prometheus text on `GET /metrics` and a
//! liveness answer on `GET /healthz`, over a deliberately small HTTP/1.1 server (one request
//! per connection, bounded request size and time) so the endpoint itself cannot be used to
//! exhaust the daemon.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

pub use prometheus_client;
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client gets to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent connections served; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;

/// What `/healthz` reports.
pub type Health = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The endpoint could not be started: its address is taken, or not this machine's.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint on {addr}")]
pub struct StartError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// A bound metrics endpoint.
pub struct MetricsServer {
    listener: TcpListener,
    registry: Arc<Mutex<Registry>>,
    health: Health,
}

impl MetricsServer {
    /// Binds `addr` (use port 0 for any free port).
    pub async fn bind(
        addr: SocketAddr,
        registry: Arc<Mutex<Registry>>,
        health: Health,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            registry,
            health,
        })
    }

    /// A daemon's start-up of its endpoint: binds `addr` and logs where the metrics are, under
    /// the daemon's `log_target` (its module path: the line and its filtering stay the
    /// daemon's). The caller spawns [`MetricsServer::serve`] where it keeps its tasks.
    pub async fn start(
        addr: SocketAddr,
        registry: Arc<Mutex<Registry>>,
        health: Health,
        log_target: &str,
    ) -> Result<Self, StartError> {
        let server = Self::bind(addr, registry, health)
            .await
            .map_err(|source| StartError { addr, source })?;
        log::info!(
            target: log_target,
            "metrics on http://{}/metrics",
            server.local_addr().unwrap_or(addr)
        );
        Ok(server)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` is cancelled.
    pub async fn serve(self, stop: CancellationToken) {
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                () = stop.cancelled() => return,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (stream, _) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        log::warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let registry = self.registry.clone();
            let health = self.health.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = handle(stream, &registry, &health).await {
                    log::debug!("metrics endpoint: {e}");
                }
            });
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    registry: &Mutex<Registry>,
    health: &Health,
) -> io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request timed out"))??;
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            let mut text = String::new();
            let encoded = match registry.lock() {
                Ok(registry) => encode(&mut text, &registry).is_ok(),
                Err(_) => false,
            };
            if encoded {
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                )
            } else {
                (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n".to_owned(),
                )
            }
        }
        ("GET", "/healthz") => match health() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the end of the request head (`\r\n\r\n`), at most [`MAX_REQUEST`] bytes.
async fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the request ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_refuses_the_rest() {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("guestwatch_test_events", "Test events", counter.clone());
        counter.inc_by(3);
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = healthy.clone();
        let health: Health = Arc::new(move || {
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err("sink down".into())
            }
        });
        let server = MetricsServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Mutex::new(registry)),
            health,
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(server.serve(stop.clone()));

        let metrics = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        assert!(
            metrics.contains("guestwatch_test_events_total 3"),
            "{metrics}"
        );
        assert!(
            get(addr, "GET /healthz HTTP/1.1\r\n\r\n")
                .await
                .contains("200 OK")
        );
        healthy.store(false, std::sync::atomic::Ordering::SeqCst);
        let down = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(down.contains("503") && down.contains("sink down"), "{down}");
        assert!(
            get(addr, "POST /metrics HTTP/1.1\r\n\r\n")
                .await
                .contains("405")
        );
        assert!(
            get(addr, "GET /nope HTTP/1.1\r\n\r\n")
                .await
                .contains("404")
        );
        // An oversized head is cut off, and the server keeps serving.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&vec![b'a'; 20_000]).await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        assert!(
            get(addr, "GET /healthz HTTP/1.1\r\n\r\n")
                .await
                .contains("503")
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn start_binds_or_says_which_address_failed() {
        let registry = || Arc::new(Mutex::new(Registry::default()));
        let health = || -> Health { Arc::new(|| Ok(())) };
        let server = MetricsServer::start(
            "127.0.0.1:0".parse().unwrap(),
            registry(),
            health(),
            module_path!(),
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(server.serve(stop.clone()));
        assert!(
            get(addr, "GET /healthz HTTP/1.1\r\n\r\n")
                .await
                .contains("200 OK")
        );
        // The port is taken now.
        let Err(err) = MetricsServer::start(addr, registry(), health(), module_path!()).await
        else {
            panic!("a second endpoint bound {addr}");
        };
        assert_eq!(err.to_string(), format!("metrics endpoint on {addr}"));
        assert_eq!(err.source.kind(), io::ErrorKind::AddrInUse);
        stop.cancel();
    }
}
