//! Caches fed by watches, shared by the controller and the agent: a reflector per resource
//! whose every event pokes one `Notify`, so a single loop can act on any change.
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

/// Longest silence tolerated on any API connection. Watches are asked to end well before it
/// ([`WATCH_TIMEOUT_SECS`]) and resume from their resourceVersion, so only a stalled
/// connection (a request or list that never answers) hits it, and is then retried on a fresh
/// connection instead of hanging the caller for the client's default ~5 minutes.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Server-side lifetime of each watch request, below [`READ_TIMEOUT`].
const WATCH_TIMEOUT_SECS: u32 = 45;

/// A client from the usual places (kubeconfig, then in-cluster) with [`READ_TIMEOUT`].
pub async fn client() -> Result<kube::Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.read_timeout = Some(READ_TIMEOUT);
    kube::Client::try_from(config)
}

/// Watch options with [`WATCH_TIMEOUT_SECS`].
pub fn config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT_SECS)
}

/// Start a reflector over `stream` in a background task. Managed fields are dropped before
/// caching (they are most of an object's size and nobody here reads them). Watch errors are
/// logged and passed to `on_error`; the stream itself retries with the caller's backoff.
pub fn reflect<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changed: Arc<Notify>,
    what: &'static str,
    on_error: impl Fn() + Send + Sync + 'static,
) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    reflect_trimmed(stream, changed, what, on_error, |_| {})
}

/// [`reflect`], with `trim` dropping more of each object before it is cached.
pub fn reflect_trimmed<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changed: Arc<Notify>,
    what: &'static str,
    on_error: impl Fn() + Send + Sync + 'static,
    trim: impl Fn(&mut K) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = reflector::reflector(
        writer,
        stream.modify(move |o: &mut K| {
            o.meta_mut().managed_fields = None;
            trim(o);
        }),
    );
    tokio::spawn(async move {
        stream
            .for_each(|ev| {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, watch = what, "watch error (retrying with backoff)");
                    on_error();
                }
                changed.notify_one();
                futures::future::ready(())
            })
            .await;
        tracing::error!(watch = what, "watch stream ended");
    });
    reader
}
