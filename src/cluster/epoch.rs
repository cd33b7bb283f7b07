//! Session epochs: the identity of one MQTT connection, ordered across the whole cluster.
//!
//! An epoch is a `u64` laid out as `ms << 21 | counter << 9 | node`: the wall-clock millisecond
//! the connection was accepted, a counter for connections accepted in the same millisecond, and
//! the id of the node that accepted it (0 on a single node). Every node draws its epochs from
//! one [`EpochClock`], a hybrid logical clock: it never goes backwards, and it moves past every
//! epoch it has *observed* from other nodes (connection events arrive over the change feed). So
//! a device that reconnects on node B after B heard of its session on node A gets a higher
//! epoch than A's, whatever the two machines' clocks say, and "the higher epoch holds the
//! device" is the one rule every node applies on its own to decide a takeover: a late message
//! about an older session can never end a newer one.
//!
//! Epochs fit PostgreSQL's `BIGINT` (the top bit stays clear until the year 2109).

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits of the node id (nodes 0..=511).
const NODE_BITS: u32 = 9;
/// Bits of the per-millisecond counter.
const COUNTER_BITS: u32 = 12;
const NODE_MASK: u64 = (1 << NODE_BITS) - 1;
/// The amount one tick of the counter adds.
const TICK: u64 = 1 << NODE_BITS;
const MS_SHIFT: u32 = NODE_BITS + COUNTER_BITS;

/// The largest node id an epoch can carry.
pub const MAX_NODE_ID: u16 = NODE_MASK as u16;

/// The node that accepted the connection of `epoch`.
pub fn node_of(epoch: u64) -> u16 {
    (epoch & NODE_MASK) as u16
}

/// The wall-clock millisecond (since the Unix epoch) an epoch was drawn at, or later when the
/// clock ran ahead to pass an observed epoch.
pub fn millis_of(epoch: u64) -> i64 {
    (epoch >> MS_SHIFT) as i64
}

/// One node's source of epochs.
#[derive(Debug)]
pub struct EpochClock {
    node: u16,
    /// The highest epoch drawn or observed, with the node bits cleared.
    last: AtomicU64,
}

impl EpochClock {
    /// A clock for node `node` (at most [`MAX_NODE_ID`]; larger ids are a configuration error
    /// checked when settings load).
    pub fn new(node: u16) -> EpochClock {
        assert!(node <= MAX_NODE_ID, "node id {node} > {MAX_NODE_ID}");
        EpochClock {
            node,
            last: AtomicU64::new(0),
        }
    }

    pub fn node(&self) -> u16 {
        self.node
    }

    /// A new epoch: higher than every epoch this clock drew or observed before.
    pub fn next(&self) -> u64 {
        self.next_at(crate::clock::now_ms())
    }

    fn next_at(&self, now_ms: i64) -> u64 {
        let wall = (now_ms.max(0) as u64) << MS_SHIFT;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            // Past both the wall clock and everything seen; the counter carries into the
            // milliseconds when more than 4,096 connections arrive in one millisecond.
            let candidate = wall.max(last + TICK);
            match self.last.compare_exchange_weak(
                last,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return candidate | u64::from(self.node),
                Err(seen) => last = seen,
            }
        }
    }

    /// The highest epoch drawn or observed so far (with this node's id): every epoch drawn
    /// after this call is higher, every one drawn before is not.
    pub fn current(&self) -> u64 {
        self.last.load(Ordering::Relaxed) | u64::from(self.node)
    }

    /// Records an epoch drawn elsewhere: later epochs of this clock are higher.
    pub fn observe(&self, epoch: u64) {
        self.last.fetch_max(epoch & !NODE_MASK, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_carry_node_and_time_and_increase() {
        let clock = EpochClock::new(7);
        let a = clock.next_at(1_700_000_000_000);
        let b = clock.next_at(1_700_000_000_000);
        let c = clock.next_at(1_699_999_999_000); // the wall clock stepped back
        assert!(a < b && b < c);
        assert_eq!([node_of(a), node_of(b), node_of(c)], [7, 7, 7]);
        assert_eq!(millis_of(a), 1_700_000_000_000);
        assert_eq!(millis_of(c), 1_700_000_000_000);
        let d = clock.next_at(1_700_000_000_005);
        assert_eq!(millis_of(d), 1_700_000_000_005);
    }

    #[test]
    fn an_observed_epoch_is_passed_even_with_a_slow_clock() {
        let fast = EpochClock::new(1);
        let slow = EpochClock::new(2);
        let remote = fast.next_at(2_000_000_000_000);
        let before = slow.next_at(1_000_000_000_000);
        assert!(before < remote);
        slow.observe(remote);
        let after = slow.next_at(1_000_000_000_001);
        assert!(after > remote, "{after} must pass {remote}");
        assert_eq!(node_of(after), 2);
    }

    #[test]
    fn equal_instants_on_two_nodes_are_ordered_by_node() {
        let a = EpochClock::new(1).next_at(5_000);
        let b = EpochClock::new(2).next_at(5_000);
        assert_ne!(a, b);
        assert!(a < b);
    }

    #[test]
    fn the_counter_carries_into_the_milliseconds() {
        let clock = EpochClock::new(0);
        let mut last = 0;
        for _ in 0..(1 << COUNTER_BITS) + 10 {
            let e = clock.next_at(1_000);
            assert!(e > last);
            last = e;
        }
        assert_eq!(millis_of(last), 1_001);
    }

    #[test]
    fn epochs_fit_a_signed_bigint_until_2109() {
        let clock = EpochClock::new(MAX_NODE_ID);
        let e = clock.next_at(4_398_046_511_103); // 2109-05-15
        assert!(i64::try_from(e).is_ok());
    }

    #[test]
    fn concurrent_draws_are_unique() {
        let clock = std::sync::Arc::new(EpochClock::new(3));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let clock = clock.clone();
                std::thread::spawn(move || (0..10_000).map(|_| clock.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
