//! Documents other nodes change: modules that keep store documents ([`Op::PutDoc`]) in memory
//! register a [`DocFollower`] with [`Cluster::follow_docs`](super::Cluster::follow_docs), and the
//! feed receiver keeps them current.
//!
//! The feed carries only a document's key (`Item::Doc { kind, id }`), like any configuration:
//! for each message, the receiver collects the keys of the kinds someone follows, re-reads them
//! in one batch from the shared store ([`SharedStore::documents`]; a key it does not find was
//! deleted) and hands each follower of the kind its body now ([`DocFollower::changed`]), in the
//! message's order, after the registry's re-reads (an instance deleted with its documents is
//! gone from the registry when its followers hear of the documents). Because what is handed
//! over is what the store holds *now*, not what the message's transaction wrote, changes made
//! through two nodes cannot be applied out of order.
//!
//! A follower's first call is always [`DocFollower::reloaded`], with every document of its
//! kinds, read when the receiver takes the follower on — whether it registered before the
//! receiver started or long after: what it loaded itself may be older than the feed position
//! the receiver is at, and messages the receiver applied before taking it on never reach it.
//! After every resynchronisation (this node may have missed messages) each follower is
//! reloaded again. Any read that fails makes the receiver resynchronise, which retries until
//! the store answers.
//!
//! The receiver skips this node's own messages: a module's own writes are in its memory
//! already, and a reload hands them back unchanged.
//!
//! [`Op::PutDoc`]: crate::store::Op::PutDoc

use super::SharedStore;
use crate::store::StoreError;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// Keeps documents of some kinds in memory and follows the changes other nodes make to them.
///
/// The receiver calls it from its own task, between feed messages: it must return quickly and
/// never block (work that waits — a broker, a disk — goes to a task of the follower's own).
pub trait DocFollower: Send + Sync + 'static {
    /// The document kinds it follows.
    fn kinds(&self) -> Vec<&'static str>;
    /// `kind`/`id` was written or deleted through another node: its body now (`None`: deleted).
    fn changed(&self, kind: &str, id: &str, body: Option<&str>);
    /// After a resync (this node may have missed changes): every document of `kind` now.
    fn reloaded(&self, kind: &str, docs: &[(String, String)]);
}

/// One stored document (see [`SharedStore::documents`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub kind: String,
    pub id: String,
    pub body: String,
}

/// The followers the receiver has taken on, by kind.
#[derive(Default)]
pub(super) struct Followers {
    by_kind: HashMap<String, Vec<Arc<dyn DocFollower>>>,
}

/// Every document of some kinds, read for [`DocFollower::reloaded`].
pub(super) struct Reload {
    kinds: Vec<String>,
    docs: BTreeMap<String, Vec<(String, String)>>,
}

impl Followers {
    /// Whether a follower follows `kind`.
    pub fn follows(&self, kind: &str) -> bool {
        self.by_kind.contains_key(kind)
    }

    /// Every kind followed.
    pub fn kinds(&self) -> Vec<String> {
        self.by_kind.keys().cloned().collect()
    }

    /// Takes `follower` on; it hears of changes from now on (reload it first: [`Reload`]).
    pub fn add(&mut self, follower: Arc<dyn DocFollower>) {
        let kinds: BTreeSet<&'static str> = follower.kinds().into_iter().collect();
        for kind in kinds {
            self.by_kind
                .entry(kind.to_owned())
                .or_default()
                .push(follower.clone());
        }
    }

    /// The keys of followed documents among `items`, each once, in the order they first appear.
    pub fn keys<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<(String, String)> {
        let mut seen = HashSet::new();
        items
            .into_iter()
            .filter(|(kind, _)| self.follows(kind))
            .filter(|key| seen.insert(*key))
            .map(|(kind, id)| (kind.to_owned(), id.to_owned()))
            .collect()
    }

    /// Re-reads `keys` in one batch and tells each key's followers its body now (a key not
    /// found was deleted), in the order of `keys`.
    pub async fn apply(
        &self,
        shared: &dyn SharedStore,
        keys: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut found: HashMap<(String, String), String> = shared
            .documents(keys.clone())
            .await?
            .into_iter()
            .map(|d| ((d.kind, d.id), d.body))
            .collect();
        for key in keys {
            let body = found.remove(&key);
            for follower in self.by_kind.get(&key.0).into_iter().flatten() {
                follower.changed(&key.0, &key.1, body.as_deref());
            }
        }
        Ok(())
    }
}

impl Reload {
    /// Reads every document of `kinds` (nothing to read: no query).
    pub async fn read(shared: &dyn SharedStore, kinds: Vec<String>) -> Result<Reload, StoreError> {
        let mut docs: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        if !kinds.is_empty() {
            for d in shared.all_documents(kinds.clone()).await? {
                docs.entry(d.kind).or_default().push((d.id, d.body));
            }
        }
        Ok(Reload { kinds, docs })
    }

    /// Hands every follower of each kind read all of its documents (none: an empty list).
    pub fn deliver(&self, followers: &Followers) {
        for kind in &self.kinds {
            let docs = self.docs.get(kind).map_or(&[][..], Vec::as_slice);
            for follower in followers.by_kind.get(kind).into_iter().flatten() {
                follower.reloaded(kind, docs);
            }
        }
    }

    /// Hands `follower` all of its kinds' documents.
    pub fn deliver_to(&self, follower: &dyn DocFollower) {
        for kind in follower.kinds() {
            let docs = self.docs.get(kind).map_or(&[][..], Vec::as_slice);
            follower.reloaded(kind, docs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{InstanceRecord, ProductRecord, Snapshot, StoredDevice};
    use futures_util::future::BoxFuture;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A shared store holding only documents; `fail` makes every read fail.
    #[derive(Default)]
    struct Docs {
        docs: Mutex<BTreeMap<(String, String), String>>,
        reads: Mutex<Vec<Vec<(String, String)>>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Docs {
        fn put(&self, kind: &str, id: &str, body: &str) {
            self.docs
                .lock()
                .unwrap()
                .insert((kind.into(), id.into()), body.into());
        }

        fn delete(&self, kind: &str, id: &str) {
            self.docs.lock().unwrap().remove(&(kind.into(), id.into()));
        }

        fn check(&self) -> Result<(), StoreError> {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Closed);
            }
            Ok(())
        }
    }

    fn unused<T: Send + 'static>() -> BoxFuture<'static, Result<T, StoreError>> {
        Box::pin(async { Err(StoreError::Closed) })
    }

    impl SharedStore for Docs {
        fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, StoreError>> {
            unused()
        }
        fn instances(
            &self,
            _: Vec<String>,
        ) -> BoxFuture<'_, Result<Vec<InstanceRecord>, StoreError>> {
            unused()
        }
        fn products(
            &self,
            _: Vec<String>,
        ) -> BoxFuture<'_, Result<Vec<ProductRecord>, StoreError>> {
            unused()
        }
        fn devices(
            &self,
            _: Vec<(String, String)>,
        ) -> BoxFuture<'_, Result<Vec<StoredDevice>, StoreError>> {
            unused()
        }
        fn documents(
            &self,
            keys: Vec<(String, String)>,
        ) -> BoxFuture<'_, Result<Vec<Document>, StoreError>> {
            Box::pin(async move {
                self.check()?;
                self.reads.lock().unwrap().push(keys.clone());
                let docs = self.docs.lock().unwrap();
                Ok(keys
                    .into_iter()
                    .filter_map(|k| {
                        docs.get(&k).map(|body| Document {
                            kind: k.0.clone(),
                            id: k.1.clone(),
                            body: body.clone(),
                        })
                    })
                    .collect())
            })
        }
        fn all_documents(
            &self,
            kinds: Vec<String>,
        ) -> BoxFuture<'_, Result<Vec<Document>, StoreError>> {
            Box::pin(async move {
                self.check()?;
                Ok(self
                    .docs
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|((kind, _), _)| kinds.contains(kind))
                    .map(|((kind, id), body)| Document {
                        kind: kind.clone(),
                        id: id.clone(),
                        body: body.clone(),
                    })
                    .collect())
            })
        }
        fn feed_position(&self, _: u16) -> BoxFuture<'_, Result<u64, StoreError>> {
            unused()
        }
        fn lease_acquire(
            &self,
            _: &'static str,
            _: u16,
            _: Duration,
        ) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
            unused()
        }
        fn lease_renew(
            &self,
            _: &'static str,
            _: u16,
            _: u64,
            _: Duration,
        ) -> BoxFuture<'_, Result<bool, StoreError>> {
            unused()
        }
        fn lease_release(
            &self,
            _: &'static str,
            _: u16,
            _: u64,
        ) -> BoxFuture<'_, Result<(), StoreError>> {
            unused()
        }
    }

    /// Records every call.
    struct Recorder {
        kinds: Vec<&'static str>,
        calls: Mutex<Vec<String>>,
    }

    impl Recorder {
        fn new(kinds: &[&'static str]) -> Arc<Recorder> {
            Arc::new(Recorder {
                kinds: kinds.to_vec(),
                calls: Mutex::new(Vec::new()),
            })
        }

        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl DocFollower for Recorder {
        fn kinds(&self) -> Vec<&'static str> {
            self.kinds.clone()
        }
        fn changed(&self, kind: &str, id: &str, body: Option<&str>) {
            self.calls
                .lock()
                .unwrap()
                .push(format!("{kind}/{id}={}", body.unwrap_or("-")));
        }
        fn reloaded(&self, kind: &str, docs: &[(String, String)]) {
            let docs: Vec<String> = docs.iter().map(|(id, b)| format!("{id}={b}")).collect();
            self.calls
                .lock()
                .unwrap()
                .push(format!("{kind}:[{}]", docs.join(",")));
        }
    }

    #[tokio::test]
    async fn followed_keys_are_re_read_in_one_batch_and_handed_over_in_message_order() {
        let store = Docs::default();
        let (a, b) = (Recorder::new(&["a"]), Recorder::new(&["a", "b"]));
        let mut followers = Followers::default();
        followers.add(a.clone());
        followers.add(b.clone());
        assert!(followers.follows("a") && followers.follows("b") && !followers.follows("c"));

        store.put("a", "2", "two");
        store.put("b", "1", "one");
        store.put("c", "1", "not followed");
        // "a/1" was written and deleted again: gone by the time it is read.
        let items = [("a", "2"), ("c", "1"), ("a", "1"), ("b", "1"), ("a", "2")];
        let keys = followers.keys(items);
        assert_eq!(
            keys,
            [("a", "2"), ("a", "1"), ("b", "1")]
                .map(|(k, i)| (k.to_owned(), i.to_owned()))
                .to_vec(),
            "followed kinds only, each key once, in message order"
        );
        followers.apply(&store, keys.clone()).await.unwrap();
        assert_eq!(store.reads.lock().unwrap().as_slice(), [keys], "one read");
        assert_eq!(a.take(), ["a/2=two", "a/1=-"]);
        assert_eq!(b.take(), ["a/2=two", "a/1=-", "b/1=one"]);

        // Nothing followed in a message: no read at all.
        followers
            .apply(&store, followers.keys([("c", "1")]))
            .await
            .unwrap();
        assert_eq!(store.reads.lock().unwrap().len(), 1);

        // A failed read calls nobody (the receiver then resynchronises).
        store.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        let keys = followers.keys([("a", "2")]);
        assert!(followers.apply(&store, keys).await.is_err());
        assert!(a.take().is_empty() && b.take().is_empty());
    }

    #[tokio::test]
    async fn a_reload_hands_every_kind_over_whole_even_when_it_has_no_documents() {
        let store = Docs::default();
        let (a, b) = (Recorder::new(&["a"]), Recorder::new(&["a", "b"]));
        let mut followers = Followers::default();
        followers.add(a.clone());
        followers.add(b.clone());
        store.put("a", "1", "x");
        store.put("a", "2", "y");
        store.put("c", "1", "z");
        let mut kinds = followers.kinds();
        kinds.sort();
        let reload = Reload::read(&store, kinds).await.unwrap();
        reload.deliver(&followers);
        assert_eq!(a.take(), ["a:[1=x,2=y]"]);
        assert_eq!(b.take(), ["a:[1=x,2=y]", "b:[]"]);

        // One follower taken on later gets its own kinds only.
        store.delete("a", "1");
        let late = Recorder::new(&["a"]);
        Reload::read(&store, vec!["a".into()])
            .await
            .unwrap()
            .deliver_to(late.as_ref());
        assert_eq!(late.take(), ["a:[2=y]"]);
        assert!(a.take().is_empty());

        store.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(Reload::read(&store, vec!["a".into()]).await.is_err());
    }
}
