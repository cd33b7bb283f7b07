//! Documents written through two nodes at once (docs/CLUSTER.md, "Documents"): whichever of
//! two racing writes of one consumer group or one rate limit the database kept, every node —
//! the two that wrote included — reports it.

use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// Rounds of each race.
const ROUNDS: u32 = 100;
/// How long a node may take to hold what the database holds (settle makes it at once).
const FOLLOW: Duration = Duration::from_secs(3);
const LIMIT: &str = "/api/v1/instances/default/forwarding/rate-limit";
const GROUPS: &str = "/api/v1/instances/default/consumer-groups";
const GROUP_LIST: &str = "/api/v1/instances/default/consumer-groups?page_size=100";

/// The body of document `kind`/`id` in the database (`Null`: none).
async fn stored(pg: &tokio_postgres::Client, kind: &str, id: &str) -> Value {
    pg.query_opt(
        "SELECT body FROM documents WHERE kind = $1 AND id = $2",
        &[&kind, &id],
    )
    .await
    .unwrap()
    .map_or(Value::Null, |row| {
        serde_json::from_str(row.get::<_, &str>(0)).unwrap()
    })
}

/// Waits (at most [`FOLLOW`]) until every node's `view` of its `path` is `want`. A node left
/// with another value keeps it (nothing else changes the document), so the bound only covers
/// settling.
async fn all_nodes_hold(
    cluster: &Cluster,
    round: u32,
    want: &Value,
    path: &str,
    view: fn(&Value) -> Value,
) {
    for node in &cluster.nodes {
        let what = format!(
            "round {round}: node {} holding the database's {want}",
            node.id
        );
        wait_for(&node.api(), path, &what, FOLLOW, |v| &view(v) == want).await;
    }
}

/// The rate limit a node runs with, as stored: `{"msgs_per_sec": …}`.
fn limit_of(body: &Value) -> Value {
    json!({ "msgs_per_sec": body["msgs_per_sec"] })
}

/// Group `raced` as a node lists it: `{"name": …, "created_at_ms": …}` (`Null`: not listed).
fn raced_group_of(body: &Value) -> Value {
    body["items"]
        .as_array()
        .and_then(|items| items.iter().find(|g| g["group_id"] == "raced"))
        .map_or(
            Value::Null,
            |g| json!({ "name": g["name"], "created_at_ms": g["created_at_ms"] }),
        )
}

/// Rate limits set through nodes 1 and 2 at the same moment, and consumer groups of one id
/// created through both at the same moment (deleted through node 3 between rounds), 100 times
/// each: after every round all three nodes hold what the database holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_of_one_document_racing_through_two_nodes_leave_every_node_with_the_databases_value()
{
    let cluster = Cluster::start(3).await;
    let (pg, conn) = tokio_postgres::connect(&cluster.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let (one, two, three) = (
        cluster.node(1).api(),
        cluster.node(2).api(),
        cluster.node(3).api(),
    );

    for round in 0..ROUNDS {
        let set = |api: &Api, n: u32| {
            let api = api.clone();
            async move {
                let body = json!({ "msgs_per_sec": n });
                api.call(Method::PUT, LIMIT, Some(body)).await
            }
        };
        let (a, b) = tokio::join!(set(&one, 1_000 + round), set(&two, 2_000 + round));
        assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}");
        let kept = stored(&pg, "amqp.rate_limit", "default").await;
        let want = json!({ "msgs_per_sec": kept["msgs_per_sec"] });
        all_nodes_hold(&cluster, round, &want, LIMIT, limit_of).await;
    }

    for round in 0..ROUNDS {
        let create = |api: &Api, name: String| {
            let api = api.clone();
            async move {
                let body = json!({ "group_id": "raced", "name": name });
                api.post(GROUPS, body).await
            }
        };
        let (a, b) = tokio::join!(
            create(&one, format!("one-{round}")),
            create(&two, format!("two-{round}"))
        );
        for (status, body) in [&a, &b] {
            assert!(*status == 201 || *status == 409, "{status} {body}");
        }
        assert!(a.0 == 201 || b.0 == 201, "{a:?} {b:?}");
        let kept = stored(&pg, "amqp.group", "default/raced").await;
        let want = json!({ "name": kept["name"], "created_at_ms": kept["created_at_ms"] });
        all_nodes_hold(&cluster, round, &want, GROUP_LIST, raced_group_of).await;

        let (status, body) = three
            .call(Method::DELETE, &format!("{GROUPS}/raced"), None)
            .await;
        assert_eq!(status, 204, "{body}");
        all_nodes_hold(&cluster, round, &Value::Null, GROUP_LIST, raced_group_of).await;
    }
}
