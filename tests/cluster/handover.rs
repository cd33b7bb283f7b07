//! A clean stop of the node that drives the engines hands them over at once (docs/CLUSTER.md,
//! "Engines"): it stops its engines, releases the lease and says so, and another node takes
//! the lease then — not when it would have expired, nor at its keeper's next periodic attempt.

use crate::harness::*;

/// The engines' lease: a dead holder is replaced after up to 10 minutes, and a node that does
/// not hold it tries to take it every 200 s (a third of it) unless told to try now.
const TTL_MS: u64 = 600_000;

/// 3 nodes with a 10-minute lease: the holder stopped with SIGTERM shortly after the cluster
/// started is replaced by another node within [`WAIT`] (20 s) of the stop — before any other
/// node's next periodic attempt (200 s after its first, at start) and long before the TTL —
/// and the engines answer through every remaining node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigtermed_engines_node_hands_them_over_before_the_lease_could_expire() {
    let options = NodeOptions {
        config: None,
        env: vec![("FLEETGATE_CLUSTER_LEASE_TTL_MS".into(), TTL_MS.to_string())],
    };
    let mut cluster = Cluster::start_with(3, &options).await;
    let holder = engines_node(&cluster, &[1, 2, 3]).await;
    let others: Vec<u16> = [1, 2, 3].into_iter().filter(|&n| n != holder).collect();
    // The others know who drives (their keepers then hear it let go).
    for &node in &others {
        wait_for(
            &cluster.node(node).api(),
            "/api/v1/cluster",
            "hear who drives the engines",
            WAIT,
            |v| {
                v["nodes"].as_array().is_some_and(|nodes| {
                    nodes
                        .iter()
                        .any(|n| n["node"] == holder && n["engines"] == true)
                })
            },
        )
        .await;
    }

    let stopped = tokio::time::Instant::now();
    cluster.node_mut(holder).stop();
    // `engines_node` gives up after WAIT (20 s): far less than the 200 s until the others'
    // next attempt of their own.
    let next = engines_node(&cluster, &others).await;
    eprintln!(
        "node {next} drives the engines {:?} after node {holder}'s SIGTERM",
        stopped.elapsed()
    );
    assert!(
        cluster.node(holder).logs().contains("lease released"),
        "node {holder} did not release the lease"
    );
    for node in others {
        wait_for(
            &cluster.node(node).api(),
            "/api/v1/ota/jobs",
            "the engines answer",
            WAIT,
            |_| true,
        )
        .await;
    }
}
