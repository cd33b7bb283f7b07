//! The per-device subscription budget: which distinct filters each device has had the router
//! create, and the cap on how many.
//!
//! # Why a budget over the process lifetime, not a count of live subscriptions
//!
//! rumqttd 0.20 keeps state per distinct filter that it never frees (`router/logs.rs`,
//! `router/routing.rs`): the first SUBSCRIBE of a filter creates a `DataLog` entry (a commit log
//! whose first segment pre-allocates 1,024 slots, waiters, a meter; ~241 KB allocated, a few KB
//! resident), a `filter_indexes` entry and a `subscription_map` key; nothing removes them when
//! the last subscriber unsubscribes or disconnects. Per connection it keeps the subscribed
//! filters, a data request per filter in the scheduler's tracker and the waiters, all freed at
//! the disconnection of a clean session; a persistent session's filters and tracker move to the
//! router's graveyard until the client id connects again (or the device is deleted, see
//! [`Downlink::forget_session`](super::Downlink::forget_session)).
//!
//! So capping the filters a connection holds at once would not bound rumqttd's memory: a device
//! could unsubscribe, or reconnect, and subscribe to new filters forever. What does bound it is
//! the number of distinct filters a device ever subscribes to — and every filter a device may
//! subscribe to lies in its own `{pk}/{dn}` namespace ([`super::acl`]), so no two devices share
//! one. This module counts them per device; past the cap, new filters are refused (SUBACK 0x80)
//! while filters the device already used stay free to subscribe again. rumqttd then holds at
//! most `devices × cap` device filters, plus the three fixed `_ss=1` filters per device, which
//! the gateway subscribes itself and which are not counted.
//!
//! The budget is kept as long as the process (as rumqttd's logs are), also for a deleted device:
//! forgetting it would let delete-and-recreate cycles add a cap's worth of logs each time.
//!
//! # Memory
//!
//! A device and a filter are kept as 64-bit hashes under a per-process random key, not as text:
//! 8 bytes per filter and ~60 per device, next to rumqttd's kilobytes per filter. A collision
//! could at worst let one device use one filter more, or two devices share one budget; the key is
//! unknown to devices, so neither can be aimed at.

use super::DeviceKey;
use dashmap::DashMap;
use std::hash::{BuildHasher, RandomState};

/// Distinct filters per device, for the process lifetime.
pub(crate) struct FilterBudget {
    /// Most distinct filters per device.
    cap: usize,
    hasher: RandomState,
    /// Device hash → hashes of the filters it subscribed to.
    used: DashMap<u64, Vec<u64>>,
}

impl FilterBudget {
    pub(crate) fn new(cap: usize) -> FilterBudget {
        FilterBudget {
            cap,
            hasher: RandomState::new(),
            used: DashMap::new(),
        }
    }

    /// Whether `device` may subscribe to `filter`: yes when it did before, or when it has used
    /// fewer than the cap (the filter is then counted). Never blocks for long: one map shard,
    /// a scan of at most `cap` hashes.
    pub(crate) fn admit(&self, device: &DeviceKey, filter: &str) -> bool {
        let key = self
            .hasher
            .hash_one((&device.product_key, &device.device_name));
        let filter = self.hasher.hash_one(filter);
        let mut used = self.used.entry(key).or_default();
        if used.contains(&filter) {
            return true;
        }
        if used.len() >= self.cap {
            return false;
        }
        used.push(filter);
        true
    }

    /// Distinct filters counted, all devices together.
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.used.iter().map(|e| e.value().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dn: &str) -> DeviceKey {
        DeviceKey {
            product_key: "pk".into(),
            device_name: dn.into(),
        }
    }

    #[test]
    fn distinct_filters_per_device_up_to_the_cap_for_good() {
        let budget = FilterBudget::new(2);
        let (a, b) = (key("devA"), key("devB"));
        // (device, filter, admitted)
        let steps = [
            (&a, "/sys/pk/devA/1", true),
            (&a, "/sys/pk/devA/1", true), // again: not counted twice
            (&a, "/sys/pk/devA/2", true),
            (&a, "/sys/pk/devA/3", false), // over the cap
            (&a, "/sys/pk/devA/1", true),  // used before: still free
            (&b, "/sys/pk/devB/1", true),  // another device has its own budget
            (&b, "/sys/pk/devB/2", true),
            (&b, "/sys/pk/devB/3", false),
            (&a, "/sys/pk/devA/3", false), // still refused: slots never come back
        ];
        for (i, (device, filter, admitted)) in steps.into_iter().enumerate() {
            assert_eq!(budget.admit(device, filter), admitted, "step {i}");
        }
        assert_eq!(budget.total(), 4);
    }
}
