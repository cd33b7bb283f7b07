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
//! **Own writes against re-reads.** A module applies its own write to memory after the commit,
//! and the receiver applies what it read from the store: unordered, a node that wrote a
//! document could end with the older of two values written through two nodes at once (its own
//! apply landing after the receiver applied another node's newer value, or the receiver
//! applying a read taken just before the node's own commit after it). So a follower whose
//! module writes its documents names its [`DocWrites`] ([`DocFollower::writes`]); the module
//! holds it from before its commit until memory is updated ([`DocWrites::begin`]), and the
//! receiver holds it from before its read until the follower has what it read. Each side
//! touches the store once inside, so memory is changed in the order of the store's commits
//! and reads: the last change applied is the last commit or a read taken after it — the
//! store's value — on every node, including the ones that wrote.
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
    /// What its module holds while it writes these documents and updates its memory (see the
    /// module docs); the receiver holds it from its read to its calls. `None`: the module
    /// never writes them on this node while the receiver runs.
    fn writes(&self) -> Option<&DocWrites> {
        None
    }
}

/// Orders a module's own writes of the documents it follows with the feed receiver's re-reads
/// of them (see the module docs).
#[derive(Debug, Default)]
pub struct DocWrites(tokio::sync::Mutex<()>);

/// A write in progress ([`DocWrites::begin`]): keep it until memory holds what was committed.
#[derive(Debug)]
pub struct DocWrite<'a> {
    _held: tokio::sync::MutexGuard<'a, ()>,
}

impl DocWrites {
    /// Waits until no re-read is being applied, and keeps the next ones out until the write is
    /// dropped.
    pub async fn begin(&self) -> DocWrite<'_> {
        DocWrite {
            _held: self.0.lock().await,
        }
    }
}

/// `follower`'s writes held, if it has any ([`DocFollower::writes`]).
async fn hold(follower: &dyn DocFollower) -> Option<DocWrite<'_>> {
    match follower.writes() {
        Some(writes) => Some(writes.begin().await),
        None => None,
    }
}

/// Takes a follower on: hands it every document of its kinds, read now (its writes held from
/// the read to the hand-over).
pub(super) async fn take_on(
    shared: &dyn SharedStore,
    follower: &dyn DocFollower,
) -> Result<(), StoreError> {
    let _writes = hold(follower).await;
    let kinds = follower.kinds().into_iter().map(str::to_owned).collect();
    Reload::read(shared, kinds).await?.deliver_to(follower);
    Ok(())
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
    /// Every follower, in the order taken on: the order their writes are held in (a writer
    /// holds only its own, so the receiver holding several never deadlocks).
    all: Vec<Arc<dyn DocFollower>>,
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
        self.all.push(follower.clone());
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

    /// The writes of the followers `concerned` says, held in the order they were taken on.
    async fn hold_writes(&self, concerned: impl Fn(&dyn DocFollower) -> bool) -> Vec<DocWrite<'_>> {
        let mut held = Vec::new();
        for follower in &self.all {
            if concerned(follower.as_ref()) {
                held.extend(hold(follower.as_ref()).await);
            }
        }
        held
    }

    /// Re-reads `keys` in one batch and tells each key's followers its body now (a key not
    /// found was deleted), in the order of `keys`. Their followers' writes are held from
    /// before the read until every follower has what it read.
    pub async fn apply(
        &self,
        shared: &dyn SharedStore,
        keys: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let kinds: HashSet<&str> = keys.iter().map(|(kind, _)| kind.as_str()).collect();
        let _writes = self
            .hold_writes(|f| f.kinds().iter().any(|k| kinds.contains(k)))
            .await;
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

    /// Hands every follower all of its kinds' documents, read now (every follower's writes
    /// held from the read to the hand-over): after a resynchronisation.
    pub async fn reload(&self, shared: &dyn SharedStore) -> Result<(), StoreError> {
        let _writes = self.hold_writes(|_| true).await;
        Reload::read(shared, self.kinds()).await?.deliver(self);
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

    /// A module that writes the documents it follows: its memory, and its writes.
    #[derive(Default)]
    struct Module {
        writes: DocWrites,
        memory: Mutex<BTreeMap<String, String>>,
    }

    impl Module {
        fn holds(&self, id: &str) -> Option<String> {
            self.memory.lock().unwrap().get(id).cloned()
        }

        fn set(&self, id: &str, body: Option<&str>) {
            let mut memory = self.memory.lock().unwrap();
            match body {
                Some(body) => memory.insert(id.to_owned(), body.to_owned()),
                None => memory.remove(id),
            };
        }
    }

    impl DocFollower for Module {
        fn kinds(&self) -> Vec<&'static str> {
            vec!["a"]
        }
        fn changed(&self, _: &str, id: &str, body: Option<&str>) {
            self.set(id, body);
        }
        fn reloaded(&self, _: &str, docs: &[(String, String)]) {
            *self.memory.lock().unwrap() = docs.iter().cloned().collect();
        }
        fn writes(&self) -> Option<&DocWrites> {
            Some(&self.writes)
        }
    }

    /// The race of two writes of one document through two nodes, as the node that wrote first
    /// sees it: its write committed, then another node's, whose feed message this node's
    /// receiver applies (`receive`, polled as far as it goes) before the first write reaches
    /// memory. Memory must end with the store's value, the other node's.
    async fn own_write_racing(
        store: &Docs,
        module: &Module,
        receive: impl std::future::Future<Output = Result<(), StoreError>>,
    ) {
        let mut receive = std::pin::pin!(receive);
        let write = module.writes.begin().await;
        store.put("a", "1", "mine");
        store.put("a", "1", "theirs");
        let early = futures_util::poll!(&mut receive);
        module.set("1", Some("mine"));
        drop(write);
        match early {
            std::task::Poll::Ready(done) => done.unwrap(),
            std::task::Poll::Pending => receive.await.unwrap(),
        }
        assert_eq!(
            module.holds("1").as_deref(),
            Some("theirs"),
            "the store's value"
        );
    }

    #[tokio::test]
    async fn an_own_write_and_the_re_reads_of_another_nodes_write_apply_in_the_stores_order() {
        let store = Docs::default();
        let module = Arc::new(Module::default());
        let mut followers = Followers::default();
        followers.add(module.clone());
        // A feed message naming the document.
        let keys = followers.keys([("a", "1")]);
        own_write_racing(&store, &module, followers.apply(&store, keys)).await;
        // A resynchronisation's reload.
        store.delete("a", "1");
        module.set("1", None);
        own_write_racing(&store, &module, followers.reload(&store)).await;
        // A follower taken on.
        store.delete("a", "1");
        module.set("1", None);
        own_write_racing(&store, &module, take_on(&store, module.as_ref())).await;
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
