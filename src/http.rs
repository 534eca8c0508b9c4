//! `/metrics`, `/healthz` (alias `/livez`) and `/readyz` on one port: axum routes, hyper serves.
//!
//! One request per connection and a deadline on the request head, so an idle or slow client
//! cannot hold the port; kubelet probes and Prometheus scrapes need nothing more. A cap on
//! connections served at once bounds memory and file descriptors (see [`Limits`]), with a share
//! kept for the node itself so a flood from elsewhere cannot starve the kubelet's probes.
//! `/metrics` can require a bearer token the API server vouches for ([`auth`]).
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub mod auth;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use auth::{Authorize, Verdict};

/// What the endpoints expose. Each process's metrics implement it.
pub trait Exporter: Send + Sync + 'static {
    /// The metric families served on `/metrics`.
    fn registry(&self) -> &Registry;
    /// `Ok` when ready for traffic; otherwise why not (the body of the 503).
    fn readiness(&self) -> Result<(), &'static str>;
}

/// Exposition formats of `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0: what Prometheus asks for in its `Accept` header.
    OpenMetrics,
    /// Prometheus text 0.0.4, for clients that do not ask (curl, older scrapers).
    Prometheus,
}

impl Format {
    /// OpenMetrics when the client lists it at all, else the Prometheus text format.
    pub fn negotiate(headers: &HeaderMap) -> Self {
        let asks = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|media| {
                let mut params = media.split(';').map(str::trim);
                params
                    .next()
                    .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                    // "q=0" means "not acceptable" (RFC 9110 §12.4.2).
                    && !params.any(|p| p.strip_prefix("q=").is_some_and(|q| q.parse() == Ok(0.0)))
            });
        if asks {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// Encode `registry` in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?
        }
    }
    Ok(out)
}

/// The metric family names a scrape shows (`# TYPE` lines of the Prometheus text format):
/// counters with their `_total`, histograms by the base name of `_bucket`, `_sum` and `_count`.
pub fn family_names(registry: &Registry) -> Vec<String> {
    encode(registry, Format::Prometheus)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Longest wait for a request head; also bounds how long a shutdown waits for connections.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted (hyper's floor); larger ones get 431.
const MAX_HEAD: usize = 8 * 1024;

/// What the handlers share: the exporter and, when `/metrics` is protected, who vouches.
#[derive(Clone)]
struct AppState {
    exporter: Arc<dyn Exporter>,
    auth: Option<Arc<dyn Authorize>>,
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
}

async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(auth) = &s.auth
        && let Some(refused) = auth::check(auth.as_ref(), &headers).await
    {
        return refused;
    }
    let format = Format::negotiate(&headers);
    match encode(s.exporter.registry(), format) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

async fn ready(State(s): State<AppState>) -> Response {
    match s.exporter.readiness() {
        Ok(()) => "ok\n".into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// How many connections one listener serves at once.
///
/// Each open connection costs about 11 KiB (its task, hyper's state and read buffer; measured
/// 10.7 KiB per idle connection), so the defaults bound the server at under 1 MiB and 72 file
/// descriptors, however many clients connect. Requests are tiny and answered at once (one per
/// connection, the head within [`HEAD_TIMEOUT`]): a scraper or two and the kubelet's probes
/// never come near the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once from any peer.
    pub max_connections: usize,
    /// Further connections only the node itself may use: a connection whose source address is
    /// the very address it reached comes from the node (the kernel picks a local destination
    /// as the source), which is where the kubelet probes a host-network pod from. A flood
    /// from other hosts or pods fills `max_connections` and no more.
    pub reserved_local: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            reserved_local: 8,
        }
    }
}

impl Limits {
    /// For a server on the pod network (the controller): the kubelet probes it from the node's
    /// address, not the pod's own, so the reserve does not cover its probes and a low cap would
    /// let a few dozen connections fail its liveness probe. This cap still bounds memory (about
    /// 45 MiB, inside the controller's limit) without making starvation cheap.
    pub const POD_NETWORK: Limits = Limits {
        max_connections: 4096,
        reserved_local: 8,
    };
}

/// Everything [`serve_with`] takes beyond the address and the exporter.
#[derive(Clone)]
pub struct Options {
    pub limits: Limits,
    /// When set, `/metrics` answers only requests whose bearer token this allows.
    pub auth: Option<Arc<dyn Authorize>>,
    /// Longest wait for a request head ([`HEAD_TIMEOUT`]; tests hold connections longer).
    pub head_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            auth: None,
            head_timeout: HEAD_TIMEOUT,
        }
    }
}

/// The connection slots of one listener: the shared ones, then the node's reserve.
struct Slots {
    shared: Arc<Semaphore>,
    local: Arc<Semaphore>,
}

impl Slots {
    fn new(l: Limits) -> Self {
        Self {
            shared: Arc::new(Semaphore::new(l.max_connections)),
            local: Arc::new(Semaphore::new(l.reserved_local)),
        }
    }

    /// A slot for this connection, held until it closes; `None` when it must be turned away.
    fn admit(&self, stream: &TcpStream, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.shared.clone().try_acquire_owned() {
            return Some(p);
        }
        let from_node = stream.local_addr().is_ok_and(|l| l.ip() == peer.ip());
        from_node
            .then(|| self.local.clone().try_acquire_owned().ok())
            .flatten()
    }
}

/// Answer a connection over the cap with a 503 and close it, without reading its request, so
/// it costs no task and no buffer. The answer fits an empty socket buffer; if it does not go
/// out at once the client only sees the close.
fn turn_away(stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n";
    let _ = stream.try_write(BUSY);
    if let Ok(std) = stream.into_std() {
        // A FIN after the answer, so a client that sent nothing reads the 503 and then EOF.
        let _ = std.shutdown(std::net::Shutdown::Write);
    }
}

/// Bind now (so a taken port fails at start-up, not later) and serve in a background task until
/// `shutdown` resolves; then stop accepting and let requests in flight finish. With
/// [`Limits::POD_NETWORK`] and no authentication (the controller; the agent uses
/// [`serve_with`]).
pub async fn serve(
    addr: SocketAddr,
    exporter: Arc<dyn Exporter>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let options = Options {
        limits: Limits::POD_NETWORK,
        ..Options::default()
    };
    serve_with(addr, exporter, options, shutdown).await
}

/// [`serve`] with explicit limits and authentication.
pub async fn serve_with(
    addr: SocketAddr,
    exporter: Arc<dyn Exporter>,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let service = TowerToHyperService::new(router(AppState {
        exporter,
        auth: options.auth,
    }));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(options.head_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false);
    let slots = Slots::new(options.limits);
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Accepting even when full keeps the backlog moving, so the node's
                        // probes reach the reserve instead of queueing behind a flood.
                        let Some(slot) = slots.admit(&stream, peer) else {
                            turn_away(stream);
                            continue;
                        };
                        let conn = graceful
                            .watch(http1.serve_connection(TokioIo::new(stream), service.clone()));
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "http connection");
                            }
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        if tokio::time::timeout(options.head_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::debug!("http connections still open at shutdown");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    use super::*;

    struct Fake {
        registry: Registry,
        ready: AtomicBool,
    }

    impl Exporter for Fake {
        fn registry(&self) -> &Registry {
            &self.registry
        }
        fn readiness(&self) -> Result<(), &'static str> {
            if self.ready.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("caches not synced")
            }
        }
    }

    /// One raw request; the server closes the connection after its answer.
    async fn send(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("the server closes the connection")
            .expect("read");
        out
    }

    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        let head = response.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn body(response: &str) -> &str {
        response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    async fn start() -> (
        SocketAddr,
        Arc<Fake>,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, fake, task) = start_with(Options::default(), stopped).await;
        (addr, fake, stop, task)
    }

    async fn start_with(
        options: Options,
        stopped: oneshot::Receiver<()>,
    ) -> (SocketAddr, Arc<Fake>, tokio::task::JoinHandle<()>) {
        let mut registry = Registry::default();
        let passes = Counter::<u64>::default();
        registry.register("demo_passes", "Passes", passes.clone());
        passes.inc_by(3);
        let fake = Arc::new(Fake {
            registry,
            ready: AtomicBool::new(false),
        });
        let (addr, task) = serve_with(
            "127.0.0.1:0".parse().expect("addr"),
            fake.clone(),
            options,
            async move {
                let _ = stopped.await;
            },
        )
        .await
        .expect("bind");
        (addr, fake, task)
    }

    #[tokio::test]
    async fn probes_and_routes() {
        let (addr, fake, stop, task) = start().await;

        let ok = send(addr, "GET /healthz?verbose HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert_eq!(body(&ok), "ok\n");
        assert_eq!(
            header(&ok, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(header(&ok, "connection"), Some("close"), "{ok}");
        let live = send(addr, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(live.starts_with("HTTP/1.1 200"), "{live}");

        let not_ready = send(addr, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            not_ready.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{not_ready}"
        );
        assert_eq!(body(&not_ready), "not ready: caches not synced\n");
        fake.ready.store(true, Ordering::Relaxed);
        let ready = send(addr, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

        // HEAD: the GET's headers, Content-Length included, and no body (RFC 9110 §9.3.2).
        let head = send(addr, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(header(&head, "content-length"), Some("3"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");

        let missing = send(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = send(addr, "POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(
            header(&post, "allow").is_some_and(|a| a.contains("GET")),
            "{post}"
        );
        let garbage = send(addr, "NOT HTTP\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        let huge = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(MAX_HEAD * 2)
        );
        let too_large = send(addr, &huge).await;
        assert!(too_large.starts_with("HTTP/1.1 431"), "{too_large}");

        stop.send(()).expect("server running");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the server stops on the shutdown signal")
            .expect("server task");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the port is closed after shutdown"
        );
    }

    #[tokio::test]
    async fn metrics_negotiate_the_format() {
        let (addr, _fake, _stop, task) = start().await;

        let plain = send(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
        assert_eq!(
            header(&plain, "content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        assert_eq!(
            body(&plain),
            "# HELP demo_passes_total Passes.\n# TYPE demo_passes_total counter\ndemo_passes_total 3\n"
        );

        // What Prometheus sends.
        let accept = "application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        let om = send(
            addr,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"),
        )
        .await;
        assert_eq!(
            header(&om, "content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        assert!(body(&om).contains("demo_passes_total 3\n"), "{om}");
        assert!(body(&om).ends_with("# EOF\n"), "{om}");

        let refused = send(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;q=0\r\n\r\n",
        )
        .await;
        assert!(
            body(&refused).starts_with("# HELP demo_passes_total"),
            "{refused}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn silent_and_slow_clients_are_dropped_after_the_head_deadline() {
        let (addr, _fake, _stop, task) = start().await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        for (who, stream) in [("silent", &mut silent), ("slow", &mut slow)] {
            let mut out = Vec::new();
            let read = tokio::time::timeout(HEAD_TIMEOUT * 3, stream.read_to_end(&mut out))
                .await
                .unwrap_or_else(|_| panic!("{who}: still open"));
            // Closed without an answer (hyper may one day send a 408 first).
            let out = String::from_utf8_lossy(&out);
            assert!(
                read.is_ok() && (out.is_empty() || out.starts_with("HTTP/1.1 408")),
                "{who}: {read:?} {out}"
            );
        }
        task.abort();
    }

    /// A connection from `source` (any 127/8 address is this host's loopback).
    async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((source, 0)))
            .expect("bind the source address");
        socket.connect(addr).await.expect("connect")
    }

    /// Everything the server sends until it closes (bounded, in case it never does).
    async fn read_all(mut s: TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
            .await
            .expect("the server answers and closes")
            .expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get_from(source: [u8; 4], addr: SocketAddr, path: &str) -> String {
        let mut s = connect_from(source, addr).await;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        read_all(s).await
    }

    /// Issue 17, item 3: a flood of idle connections from elsewhere fills the shared slots and
    /// no more (the rest are turned away with a 503 at once, costing no task), while the node's
    /// own probes still get through on the reserve, which is bounded too.
    #[tokio::test]
    async fn a_connection_flood_is_capped_and_the_nodes_probes_still_answered() {
        let (stop, stopped) = oneshot::channel::<()>();
        let options = Options {
            limits: Limits {
                max_connections: 4,
                reserved_local: 2,
            },
            // Long enough that the held connections cannot time out while the test runs.
            head_timeout: Duration::from_secs(600),
            auth: None,
        };
        let (addr, _fake, task) = start_with(options, stopped).await;
        const NODE: [u8; 4] = [127, 0, 0, 1];
        const ELSEWHERE: [u8; 4] = [127, 0, 0, 2];

        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(connect_from(ELSEWHERE, addr).await);
        }
        // Accepted in order: the fifth from elsewhere finds the shared slots taken.
        let over = read_all(connect_from(ELSEWHERE, addr).await).await;
        assert!(
            over.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{over:?}"
        );
        assert_eq!(body(&over), "too many connections\n");

        // The node itself (source address = the address it reached) uses the reserve.
        let probe = get_from(NODE, addr, "/healthz").await;
        assert!(probe.starts_with("HTTP/1.1 200"), "{probe}");
        let mut reserve = Vec::new();
        for _ in 0..2 {
            reserve.push(connect_from(NODE, addr).await);
        }
        let full = read_all(connect_from(NODE, addr).await).await;
        assert!(
            full.starts_with("HTTP/1.1 503"),
            "the reserve is capped: {full:?}"
        );

        // Closing the flood frees its slots for everyone again.
        drop(held);
        let mut answered = String::new();
        for _ in 0..200 {
            answered = get_from(ELSEWHERE, addr, "/metrics").await;
            if answered.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        drop(stop);
        task.abort();
    }

    #[test]
    fn family_names_come_from_the_registry() {
        let mut registry = Registry::default();
        registry.register("a_passes", "Passes", Counter::<u64>::default());
        assert_eq!(family_names(&registry), ["a_passes_total"]);
    }
}
