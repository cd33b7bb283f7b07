//! What must differ between installations that share infrastructure: the default AMQP
//! exchange prefix. Two gateways on one RabbitMQ with the same prefix declare the same
//! exchanges, so each would feed the other's consumer groups. When `amqp.exchange_prefix` is
//! not set, the first start picks `fleetgate-{8 hex digits}` and keeps it in the store (a
//! document: the nodes of a cluster, sharing their PostgreSQL store, share it too); every
//! later start reads it back, so queue names never change under running consumers.
//!
//! A store that already has consumer groups from before this existed keeps the old shared
//! default, `fleetgate` — its consumers read those queues — and the start warns about it.

use crate::store::{Op, Store, StoreError};

/// Store document kind of the installation's settings.
pub const DOC_KIND: &str = "installation";
/// Document id of the exchange prefix chosen on first start.
const PREFIX_DOC: &str = "amqp_exchange_prefix";
/// The prefix every installation used before it was made unique, and the one it keeps.
pub const SHARED_PREFIX: &str = "fleetgate";

/// The AMQP exchange prefix to run with: `configured` when set, else this installation's own
/// (created and stored on first start).
pub fn exchange_prefix(store: &Store, configured: &str) -> Result<String, StoreError> {
    if !configured.is_empty() {
        return Ok(configured.to_owned());
    }
    if let Some((_, prefix)) = store
        .load_documents(DOC_KIND)?
        .into_iter()
        .find(|(id, _)| id == PREFIX_DOC)
    {
        return Ok(prefix);
    }
    let upgraded = !store
        .load_documents(crate::forwarder::GROUP_DOC_KIND)?
        .is_empty();
    let prefix = if upgraded {
        SHARED_PREFIX.to_owned()
    } else {
        format!("{SHARED_PREFIX}-{:08x}", rand::random::<u32>())
    };
    store.submit_blocking(vec![Op::PutDoc {
        kind: DOC_KIND,
        id: PREFIX_DOC.to_owned(),
        body: prefix.clone(),
    }])?;
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::Arc;

    #[test]
    fn a_new_store_gets_a_prefix_of_its_own_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetgate.db");
        let first = {
            let store = Store::open(&path, Arc::new(Metrics::new())).unwrap();
            exchange_prefix(&store, "").unwrap()
        };
        assert!(first.starts_with("fleetgate-"), "{first}");
        assert_eq!(first.len(), "fleetgate-".len() + 8);
        let store = Store::open(&path, Arc::new(Metrics::new())).unwrap();
        assert_eq!(exchange_prefix(&store, "").unwrap(), first, "kept");
        assert_eq!(exchange_prefix(&store, "mine").unwrap(), "mine");

        let other = Store::open_in_memory(Arc::new(Metrics::new())).unwrap();
        assert_ne!(exchange_prefix(&other, "").unwrap(), first);
    }

    #[test]
    fn a_store_with_consumer_groups_keeps_the_shared_prefix() {
        let store = Store::open_in_memory(Arc::new(Metrics::new())).unwrap();
        store
            .submit_blocking(vec![Op::PutDoc {
                kind: crate::forwarder::GROUP_DOC_KIND,
                id: "default/g1".into(),
                body: "{}".into(),
            }])
            .unwrap();
        assert_eq!(exchange_prefix(&store, "").unwrap(), SHARED_PREFIX);
    }
}
