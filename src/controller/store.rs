//! A watch cache that keeps a digest per object instead of the object: each watch event is
//! reduced as it arrives (see [`super::cache`]), so the controller never holds the objects
//! themselves, their metadata, or the reflector's second copy during a re-list.
//!
//! The store also remembers when the first *urgent* change (one its classifier says users wait
//! for: [`super::trigger`]) since the last [`DigestStore::take_changed`] arrived, and wakes
//! [`DigestStore::urgent_change`]: the leader starts a pass at once for those, and measures its
//! own latency from there to the status patch it sends.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use tokio::sync::{Notify, watch};

use super::cache::Interner;

/// Digests by object name.
pub type Digests<D> = HashMap<Arc<str>, Arc<D>>;

/// The read side, cloned freely.
pub struct DigestStore<D> {
    shared: Arc<Shared<D>>,
    ready: watch::Receiver<bool>,
}

impl<D> Clone for DigestStore<D> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            ready: self.ready.clone(),
        }
    }
}

struct Shared<D> {
    digests: RwLock<Digests<D>>,
    /// When the oldest urgent change not yet taken by a pass arrived.
    changed_at: Mutex<Option<Instant>>,
    urgent: Notify,
}

/// Whether a change from the old digest to the new one (None: absent) is urgent.
pub type Urgency<D> = fn(Option<&D>, Option<&D>) -> bool;

/// What a watched object comes down to.
pub enum Digested<D> {
    /// Keep this digest under the object's name.
    Keep(D),
    /// Nothing to keep (no status yet, or the object is invalid): as if absent.
    Drop,
}

/// The write side: applies watch events.
pub struct DigestWriter<D> {
    shared: Arc<Shared<D>>,
    ready: watch::Sender<bool>,
    /// The listing being received (between `Init` and `InitDone`).
    listing: Option<Digests<D>>,
    names: Interner,
    urgency: Urgency<D>,
}

/// A new empty store and its writer, where every change is urgent.
#[cfg(test)]
pub fn digest_store<D>() -> (DigestStore<D>, DigestWriter<D>) {
    digest_store_with(|_, _| true)
}

/// A new empty store and its writer; `urgency` tells urgent changes from the others.
pub fn digest_store_with<D>(urgency: Urgency<D>) -> (DigestStore<D>, DigestWriter<D>) {
    let shared = Arc::new(Shared {
        digests: RwLock::new(HashMap::new()),
        changed_at: Mutex::new(None),
        urgent: Notify::new(),
    });
    let (tx, rx) = watch::channel(false);
    (
        DigestStore {
            shared: shared.clone(),
            ready: rx,
        },
        DigestWriter {
            shared,
            ready: tx,
            listing: None,
            names: Interner::default(),
            urgency,
        },
    )
}

/// The watch ended before the first listing completed.
#[derive(Debug, thiserror::Error)]
#[error("the watch ended before its first listing")]
pub struct NeverSynced;

impl<D> DigestStore<D> {
    /// The digests now (a copy of the index; the digests are shared).
    pub fn snapshot(&self) -> Digests<D> {
        self.shared
            .digests
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shared
            .digests
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether an urgent change is waiting for a pass.
    pub fn urgent_pending(&self) -> bool {
        self.shared
            .changed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Resolves at the next urgent change (or at once for one that arrived since the last
    /// call returned).
    pub async fn urgent_change(&self) {
        self.shared.urgent.notified().await;
    }

    /// When the oldest urgent change not yet taken arrived, and forget it.
    pub fn take_changed(&self) -> Option<Instant> {
        self.shared
            .changed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Resolves once the first listing is complete.
    pub async fn wait_until_ready(&self) -> Result<(), NeverSynced> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| NeverSynced)
    }
}

impl<D> DigestWriter<D> {
    /// Applies one watch event; `digest` reduces an object, `name` names it.
    pub fn apply<K>(
        &mut self,
        event: watcher::Event<K>,
        name: impl Fn(&K) -> Option<&str>,
        digest: impl Fn(&K, &mut Interner) -> Digested<D>,
    ) {
        match event {
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(k) => {
                if let (Some(n), Digested::Keep(d)) = (name(&k), digest(&k, &mut self.names)) {
                    // Object names are unique: not interned (one allocation either way).
                    let n: Arc<str> = Arc::from(n);
                    self.listing
                        .get_or_insert_with(HashMap::new)
                        .insert(n, Arc::new(d));
                }
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                *self.write() = listed;
                // A (re-)listing may hide any change: urgent.
                self.mark_changed(true);
                self.ready.send_replace(true);
            }
            watcher::Event::Apply(k) => {
                let Some(n) = name(&k) else { return };
                let new = match digest(&k, &mut self.names) {
                    Digested::Keep(d) => Some(Arc::new(d)),
                    Digested::Drop => None,
                };
                let old = match &new {
                    Some(d) => self.write().insert(Arc::from(n), d.clone()),
                    None => self.write().remove(n),
                };
                self.mark_changed((self.urgency)(old.as_deref(), new.as_deref()));
            }
            watcher::Event::Delete(k) => {
                if let Some(n) = name(&k) {
                    let old = self.write().remove(n);
                    self.mark_changed((self.urgency)(old.as_deref(), None));
                }
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Digests<D>> {
        self.shared
            .digests
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps the oldest untaken urgent change's time, and wakes the leader for it.
    fn mark_changed(&self, urgent: bool) {
        if !urgent {
            return;
        }
        self.shared
            .changed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(Instant::now);
        self.shared.urgent.notify_one();
    }
}

/// Runs `stream` into a new store in a background task: every event pokes `changed`; watch
/// errors are logged and passed to `on_error` (the stream retries with the caller's backoff).
/// `name` names an object, `digest` reduces it, `urgency` judges a change of its digest.
pub fn watch_digests<K, D>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changed: Arc<Notify>,
    what: &'static str,
    on_error: impl Fn() + Send + Sync + 'static,
    name: impl Fn(&K) -> Option<&str> + Send + 'static,
    digest: impl Fn(&K, &mut Interner) -> Digested<D> + Send + 'static,
    urgency: Urgency<D>,
) -> DigestStore<D>
where
    K: Send + 'static,
    D: Send + Sync + 'static,
{
    let (store, mut writer) = digest_store_with(urgency);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => writer.apply(ev, &name, &digest),
                Err(e) => {
                    tracing::warn!(error = %e, watch = what, "watch error (retrying with backoff)");
                    on_error();
                }
            }
            changed.notify_one();
        }
        tracing::error!(watch = what, "watch stream ended");
    });
    store
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use watcher::Event;

    /// Objects are (name, value); a negative value digests to nothing.
    fn apply(w: &mut DigestWriter<i32>, ev: Event<(&'static str, i32)>) {
        w.apply(
            ev,
            |(n, _)| Some(*n),
            |(_, v), _| {
                if *v < 0 {
                    Digested::Drop
                } else {
                    Digested::Keep(*v)
                }
            },
        );
    }

    fn view(s: &DigestStore<i32>) -> Vec<(String, i32)> {
        let mut v: Vec<(String, i32)> = s
            .snapshot()
            .iter()
            .map(|(n, d)| (n.to_string(), **d))
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_listing_replaces_the_view_at_once_and_events_keep_it_current() {
        let (store, mut w) = digest_store::<i32>();
        apply(&mut w, Event::Init);
        apply(&mut w, Event::InitApply(("a", 1)));
        apply(&mut w, Event::InitApply(("b", -1)));
        // Not ready, nothing shown until the listing is complete.
        assert!(store.is_empty());
        assert!(!*store.ready.borrow());
        apply(&mut w, Event::InitDone);
        store.wait_until_ready().await.expect("ready");
        assert_eq!(view(&store), [("a".into(), 1)]);

        apply(&mut w, Event::Apply(("b", 2)));
        apply(&mut w, Event::Apply(("a", -1)));
        assert_eq!(view(&store), [("b".into(), 2)]);
        apply(&mut w, Event::Delete(("b", 2)));
        assert!(store.is_empty());

        // A re-list keeps the old view until it is complete, then drops what it did not list.
        apply(&mut w, Event::Apply(("c", 3)));
        apply(&mut w, Event::Init);
        apply(&mut w, Event::InitApply(("d", 4)));
        assert_eq!(view(&store), [("c".into(), 3)]);
        apply(&mut w, Event::InitDone);
        assert_eq!(view(&store), [("d".into(), 4)]);
    }

    #[test]
    fn the_oldest_untaken_change_is_remembered_once() {
        let (store, mut w) = digest_store::<i32>();
        assert_eq!(store.take_changed(), None);
        apply(&mut w, Event::Apply(("a", 1)));
        let first = store
            .shared
            .changed_at
            .lock()
            .expect("lock")
            .expect("marked");
        apply(&mut w, Event::Apply(("a", 2)));
        assert_eq!(store.take_changed(), Some(first));
        assert_eq!(store.take_changed(), None);
        apply(&mut w, Event::Delete(("a", 2)));
        assert!(store.take_changed().is_some_and(|t| t >= first));
    }

    /// Only urgent changes are remembered for the latency and wake the leader: here a change
    /// is urgent when the value's sign changes (the leader's rule is [`super::super::trigger`]).
    #[tokio::test]
    async fn only_urgent_changes_are_marked_and_wake_the_leader() {
        let (store, mut w) =
            digest_store_with::<i32>(|old, new| old.map(|v| v.signum()) != new.map(|v| v.signum()));
        apply(&mut w, Event::Apply(("a", 1)));
        assert!(store.urgent_pending(), "a new object");
        assert!(store.take_changed().is_some());
        // The permit of that change is still there; take it.
        store.urgent_change().await;
        apply(&mut w, Event::Apply(("a", 5)));
        assert!(!store.urgent_pending(), "telemetry");
        assert_eq!(store.take_changed(), None);
        let woken = tokio::time::timeout(Duration::from_millis(50), store.urgent_change()).await;
        assert!(
            woken.is_err(),
            "a telemetry change does not wake the leader"
        );
        apply(&mut w, Event::Delete(("a", 5)));
        assert!(store.urgent_pending(), "gone");
        tokio::time::timeout(Duration::from_secs(5), store.urgent_change())
            .await
            .expect("woken");
    }

    #[tokio::test]
    async fn a_watch_that_ends_before_listing_never_syncs() {
        let (store, w) = digest_store::<i32>();
        drop(w);
        assert!(store.wait_until_ready().await.is_err());
    }
}
