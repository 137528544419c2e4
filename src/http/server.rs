//! The listener: accepts connections (plain or TLS), counts them, and hands them to hyper.
//!
//! warp's own server takes no limits, so pgrelay accepts connections itself, the way warp
//! does internally, and adds what a server facing the internet needs:
//! - a cap on open connections, kept below the process's file-descriptor limit, and one per
//!   client address; a connection past a cap gets a short answer instead of hanging;
//! - past the total cap, a few more connections are still served the health routes
//!   (`/healthz`, `/readyz`, `/metrics`), one request each, so probes keep working while the
//!   relay is full;
//! - a deadline for each request's headers (slowloris), and for the TLS handshake.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How long a client may take to open a TLS connection (send its first bytes, then finish the
/// handshake) before it is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections past the total cap that are still served the health routes.
const HEALTH_SLOTS: usize = 16;

/// How long a connection in a health slot may take to send its request.
const HEALTH_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// File descriptors kept free for everything that is not a client connection: the database
/// pool and capture, files, DNS, and the health slots.
const FD_RESERVE: u64 = 64;

/// Open connections, in total and per client address.
#[derive(Debug)]
pub struct Connections {
    max_total: usize,
    max_per_ip: usize,
    state: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    health: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// What a new connection gets.
enum Admission {
    /// Served; the slot is freed when the guard drops.
    Serve(Slot),
    /// Past the total cap, in a health slot: the health routes, one request.
    Health(Slot),
    /// Past the total cap and the health slots.
    Full,
    /// Past the cap for its address.
    TooManyFromPeer,
}

/// A counted connection; dropping it frees its place.
pub struct Slot {
    connections: Arc<Connections>,
    ip: IpAddr,
    health: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self
            .connections
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.health {
            counts.health -= 1;
        } else {
            counts.total -= 1;
        }
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Connections {
    /// Caps: `max_total` (lowered below the file-descriptor limit) and `max_per_ip`.
    pub fn new(max_total: usize, max_per_ip: usize, reserved_fds: u64) -> Arc<Connections> {
        let fds = raise_fd_limit();
        let usable = fds.saturating_sub(FD_RESERVE + reserved_fds) as usize;
        let total = max_total.min(usable.max(1));
        if total < max_total {
            tracing::warn!(
                configured = max_total,
                fd_limit = fds,
                max_connections = total,
                "the file descriptor limit is too low for max_connections: lowered (raise `ulimit -n` to serve more)"
            );
        }
        Arc::new(Connections {
            max_total: total,
            max_per_ip,
            state: Mutex::new(Counts::default()),
        })
    }

    /// The total cap in effect.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Admission {
        let mut counts = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let from_peer = counts.per_ip.get(&ip).copied().unwrap_or(0);
        if from_peer >= self.max_per_ip {
            return Admission::TooManyFromPeer;
        }
        let health = if counts.total < self.max_total {
            counts.total += 1;
            false
        } else if counts.health < HEALTH_SLOTS {
            counts.health += 1;
            true
        } else {
            return Admission::Full;
        };
        *counts.per_ip.entry(ip).or_insert(0) += 1;
        let slot = Slot {
            connections: Arc::clone(self),
            ip,
            health,
        };
        if health {
            Admission::Health(slot)
        } else {
            Admission::Serve(slot)
        }
    }
}

/// Raises the soft limit on open files to the hard limit, and returns the limit in effect.
fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(err) => {
            tracing::debug!(error = %err, "cannot read or raise the open file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// Serves `routes` on `listener` (TLS when `tls` is set) until `token` is cancelled, then lets
/// requests in flight finish. `health` answers connections past the total cap.
pub async fn serve<F, R, H, HR>(
    routes: F,
    health: H,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    connections: Arc<Connections>,
    header_timeout: Duration,
    token: CancellationToken,
) where
    F: warp::Filter<Extract = (R,), Error = Infallible> + Clone + Send + Sync + 'static,
    R: warp::Reply,
    H: warp::Filter<Extract = (HR,), Error = Infallible> + Clone + Send + Sync + 'static,
    HR: warp::Reply,
{
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            // priority 1: shutdown
            _ = token.cancelled() => break,
            // priority 2: new connections
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors after all: wait for some to close (as warp does).
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Frames go out as soon as they are written: with Nagle's algorithm a small frame
        // waits for the ACK of the one before it, which a client's delayed ACK may hold for
        // up to 40 ms (BENCHMARKS.md 0a: poll mode, 20 subscribers, p90 33 -> 3.3 ms).
        // Best effort.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        let admission = connections.admit(peer.ip());
        let (slot, full_service) = match admission {
            Admission::Serve(slot) => (slot, true),
            Admission::Health(slot) => (slot, false),
            Admission::Full => {
                tracing::debug!(%peer, "connection refused: the relay is at max_connections");
                tokio::spawn(refuse(
                    tcp,
                    tls.is_some(),
                    503,
                    "unavailable",
                    "The relay is at its connection limit; try again later",
                ));
                continue;
            }
            Admission::TooManyFromPeer => {
                tracing::debug!(%peer, "connection refused: too many from this address");
                tokio::spawn(refuse(
                    tcp,
                    tls.is_some(),
                    429,
                    "too_many_connections",
                    "Too many connections from this address",
                ));
                continue;
            }
        };
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let routes = routes.clone();
        let health = health.clone();
        let span = tracing::info_span!("connection", %peer);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(if full_service {
                        header_timeout
                    } else {
                        HEALTH_HEADER_TIMEOUT
                    })
                    .keep_alive(full_service);
                let Some(io) = open(tcp, peer, tls, slot).await else {
                    return;
                };
                let result = if full_service {
                    let service = TowerToHyperService::new(warp::service(routes));
                    watcher
                        .watch(
                            builder
                                .serve_connection_with_upgrades(io, service)
                                .into_owned(),
                        )
                        .await
                } else {
                    let service = TowerToHyperService::new(warp::service(health));
                    watcher
                        .watch(builder.serve_connection(io, service).into_owned())
                        .await
                };
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
            },
            span,
        ));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection's byte stream: TCP, or TLS over it once the handshake is done. It holds the
/// connection's [`Slot`], so the count stays right after a WebSocket upgrade hands the
/// stream over (it is freed when the socket is dropped, not when HTTP is done with it).
type Io = TokioIo<Counted>;

/// A stream and its slot.
pub struct Counted {
    stream: Box<dyn Stream>,
    _slot: Slot,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// What hyper needs of a connection.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

async fn open(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    slot: Slot,
) -> Option<Io> {
    let counted = |stream: Box<dyn Stream>| {
        TokioIo::new(Counted {
            stream,
            _slot: slot,
        })
    };
    let Some(tls) = tls else {
        return Some(counted(Box::new(tcp)));
    };
    let opened = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, async {
        if sends_plain_http(&tcp).await {
            refuse_plain_http(tcp).await;
            return None;
        }
        tls.accept(tcp)
            .await
            .inspect_err(|err| tracing::debug!(error = %err, %peer, "tls handshake failed"))
            .ok()
    });
    match opened.await {
        Ok(Some(stream)) => Some(counted(Box::new(stream))),
        _ => None,
    }
}

/// Answers a connection that cannot be served with a short JSON error, then closes it (over
/// TLS, where no plain answer can be read, it is just closed). `GET /healthz` is answered
/// 200 even so: the process is up, which is all it says.
async fn refuse(mut tcp: TcpStream, tls: bool, status: u16, code: &str, message: &str) {
    if tls {
        return;
    }
    // Take in what the client sent first: closing with unread bytes would reset the
    // connection, and the client might lose the answer.
    let mut request = [0u8; 1024];
    // (Up to a second: under load a health check's request can take a while to arrive, and
    // a refusal without it would answer /healthz with 503. Readiness can be spurious: a read
    // that would block waits again.)
    let read = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if tcp.readable().await.is_err() {
                return 0;
            }
            match tcp.try_read(&mut request) {
                Ok(n) => return n,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return 0,
            }
        }
    })
    .await
    .unwrap_or(0);
    let (status, reason, body) = if request[..read].starts_with(b"GET /healthz ") {
        (200, "OK", serde_json::json!({"status": "ok"}).to_string())
    } else {
        let reason = if status == 429 {
            "Too Many Requests"
        } else {
            "Service Unavailable"
        };
        let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
        (status, reason, body)
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tcp.write_all(response.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// Whether a client's first byte starts something other than a TLS handshake record (0x16):
/// an HTTP request line starts with a letter.
async fn sends_plain_http(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(tcp.peek(&mut first).await, Ok(1) if first[0].is_ascii_alphabetic())
}

/// Answers plain HTTP sent to the TLS listener with a 400 that says so (a TLS alert would
/// mean nothing to the client), then closes.
async fn refuse_plain_http(mut tcp: TcpStream) {
    let body = r#"{"error":{"code":"bad_request","message":"This port serves HTTPS and WSS only: use https:// or wss://"}}"#;
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Take in what the client sent first: closing with unread bytes would reset the
    // connection, and the client might lose the answer.
    let mut request = [0u8; 4096];
    let _ = tcp.try_read(&mut request);
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}
