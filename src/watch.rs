//! Caches fed by watches, shared by the controller and the agent: a reflector per resource
//! whose every event pokes one `Notify`, so a single loop can act on any change.
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

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
    let (reader, writer) = reflector::store::<K>();
    let stream = reflector::reflector(
        writer,
        stream.modify(|o: &mut K| o.meta_mut().managed_fields = None),
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
