//! `/metrics`, `/healthz` (alias `/livez`) and `/readyz` on one port: axum routes, hyper serves.
//!
//! One request per connection and a deadline on the request head, so an idle or slow client
//! cannot hold the port; kubelet probes and Prometheus scrapes need nothing more.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

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

fn router(exporter: Arc<dyn Exporter>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(exporter)
}

async fn metrics(State(e): State<Arc<dyn Exporter>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(&headers);
    match encode(e.registry(), format) {
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

async fn ready(State(e): State<Arc<dyn Exporter>>) -> Response {
    match e.readiness() {
        Ok(()) => "ok\n".into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// Bind now (so a taken port fails at start-up, not later) and serve in a background task until
/// `shutdown` resolves; then stop accepting and let requests in flight finish.
pub async fn serve(
    addr: SocketAddr,
    exporter: Arc<dyn Exporter>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let service = TowerToHyperService::new(router(exporter));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false);
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let conn = graceful
                            .watch(http1.serve_connection(TokioIo::new(stream), service.clone()));
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "http connection");
                            }
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
        if tokio::time::timeout(HEAD_TIMEOUT, graceful.shutdown())
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
        let mut registry = Registry::default();
        let passes = Counter::<u64>::default();
        registry.register("demo_passes", "Passes", passes.clone());
        passes.inc_by(3);
        let fake = Arc::new(Fake {
            registry,
            ready: AtomicBool::new(false),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, task) = serve(
            "127.0.0.1:0".parse().expect("addr"),
            fake.clone(),
            async move {
                let _ = stopped.await;
            },
        )
        .await
        .expect("bind");
        (addr, fake, stop, task)
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

    #[test]
    fn family_names_come_from_the_registry() {
        let mut registry = Registry::default();
        registry.register("a_passes", "Passes", Counter::<u64>::default());
        assert_eq!(family_names(&registry), ["a_passes_total"]);
    }
}
