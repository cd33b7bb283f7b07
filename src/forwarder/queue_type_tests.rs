//! `amqp.queue_type` against a real RabbitMQ (the broker of [`super::amqp_tests`]; a missing
//! one fails the test under `CI=true`): quorum group queues are quorum queues and are fed, and
//! a queue that exists with the other type is reported without holding up the other groups.
//! Every test has its own exchange prefix and deletes what it declared.

use super::amqp_tests::{collect, consume, eventually, rabbit, Fixture};
use super::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Connection;
use tokio::sync::mpsc;

/// The TTL every group of these tests gets (the configured default).
const TTL_SECS: u32 = 86_400;

fn open_with(fx: &Fixture, queue_type: QueueType) -> Arc<Forwarder> {
    let settings = AmqpSettings {
        queue_type,
        ..fx.settings(&fx.rabbit.url)
    };
    Forwarder::open(
        ForwarderConfig::for_tests(settings),
        fx.dir.path(),
        fx.registry.store().clone(),
        fx.registry.clone(),
        fx.metrics.clone(),
    )
    .unwrap()
}

/// Arguments as a client of its own would write them: the TTL, and `x-queue-type` when given.
fn arguments(ttl_secs: u32, queue_type: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::from(ttl_secs) * 1000),
    );
    if let Some(t) = queue_type {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(t)),
        );
    }
    args
}

/// Declares `queue` (durable) with `args` on a throwaway channel.
async fn declare(conn: &Connection, queue: &str, args: FieldTable) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions::durable(),
            args,
        )
        .await
        .map(|_| ());
    if ch.status().connected() {
        let _ = ch.close(200, "done".into()).await;
    }
    r
}

/// Asserts that declaring `queue` with `args` is refused (406) because of its type.
async fn refused_for_its_type(conn: &Connection, queue: &str, args: FieldTable) {
    let e = declare(conn, queue, args)
        .await
        .expect_err("the queue has the other type");
    assert!(groups::is_precondition_failed(&e), "{e}");
    assert!(
        groups::reply_text(&e).contains("'x-queue-type'"),
        "refused for something else: {e}"
    );
}

async fn create(fwd: &Forwarder, iid: &str, gid: &str) {
    fwd.create_group(
        iid,
        NewConsumerGroup {
            group_id: Some(gid.into()),
            name: gid.into(),
            message_ttl_secs: None,
        },
    )
    .await
    .unwrap();
}

fn queue_error_gauge(fx: &Fixture, gid: &str) -> i64 {
    fx.metrics
        .forwarder_group_queue_error
        .get_or_create(&[
            ("group", groups::doc_id(&fx.iid, gid)),
            ("status", "type_mismatch".into()),
        ])
        .get()
}

/// With `queue_type = "quorum"` every group's queue is a quorum queue — a classic declare of
/// it (with or without `x-queue-type: classic`) is refused on the type, a quorum one accepted —
/// and messages reach every group end to end.
#[tokio::test]
async fn quorum_group_queues_are_quorum_queues_and_receive_every_message() {
    let rabbit = rabbit("quorum_group_queues_are_quorum_queues_and_receive_every_message").await;
    let fx = Fixture::new(rabbit, 2).await;
    let fwd = open_with(&fx, QueueType::Quorum);
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    create(&fwd, &fx.iid, "q1").await;
    create(&fwd, &fx.iid, "q2").await;
    let conn = &fx.rabbit.conn;
    for gid in ["q1", "q2"] {
        let queue = fx.queue(gid);
        refused_for_its_type(conn, &queue, arguments(TTL_SECS, None)).await;
        refused_for_its_type(conn, &queue, arguments(TTL_SECS, Some("classic"))).await;
        declare(conn, &queue, arguments(TTL_SECS, Some("quorum")))
            .await
            .expect("the same quorum queue");
        let d = fwd.group_details(&fx.iid, gid).await.unwrap();
        assert_eq!(
            (d.queue_type, d.queue_status, d.queue_error.as_deref()),
            (QueueType::Quorum, QueueStatus::Declared, None)
        );
    }

    let (tx1, mut rx1) = mpsc::unbounded_channel();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    consume(conn, &fx.queue("q1"), "c1", tx1).await;
    consume(conn, &fx.queue("q2"), "c2", tx2).await;
    for i in 0..20 {
        fwd.enqueue(fx.post(i % 2, i), OnFull::Refuse)
            .await
            .unwrap();
    }
    let got1 = collect(&mut rx1, 20).await;
    let got2 = collect(&mut rx2, 20).await;
    assert!(got1.len() >= 20 && got2.len() >= 20);
    eventually("outbox drained", || fwd.outbox().unwrap().is_empty()).await;
    assert_eq!(
        fx.metrics.forwarder_returns.get(),
        0,
        "routed to the groups"
    );
    assert_eq!(fx.metrics.forwarder_queues_kept.get(), 0);
    assert_eq!(queue_error_gauge(&fx, "q1"), 0);
    fwd.shutdown().await;
    fx.cleanup(&["q1", "q2"]).await;
}

/// A group whose queue already exists with the other type (made while `queue_type` was
/// `classic`) is reported — status, message naming the group and the fix, gauge — its queue is
/// kept and still fed, and the other groups are declared and fed as configured; on a restart
/// (where the connection declares every group) the same; and the other way round for a
/// classic-configured gateway that finds a quorum queue.
#[tokio::test]
async fn a_queue_of_the_other_type_is_reported_and_every_group_keeps_receiving() {
    let rabbit =
        rabbit("a_queue_of_the_other_type_is_reported_and_every_group_keeps_receiving").await;
    let fx = Fixture::new(rabbit, 1).await;
    let conn = &fx.rabbit.conn;
    // What a classic-configured gateway declared: the same TTL, classic.
    declare(conn, &fx.queue("old"), arguments(TTL_SECS, None))
        .await
        .unwrap();
    let fwd = open_with(&fx, QueueType::Quorum);
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    create(&fwd, &fx.iid, "old").await;
    create(&fwd, &fx.iid, "new").await;

    let old = fwd.group_details(&fx.iid, "old").await.unwrap();
    assert_eq!(old.queue_status, QueueStatus::TypeMismatch);
    let error = old.queue_error.expect("an error message");
    for part in [
        format!("consumer group {}/old", fx.iid),
        fx.queue("old"),
        "amqp.queue_type = \"quorum\"".into(),
        "x-queue-type".into(),
        "delete the consumer group and create it again".into(),
    ] {
        assert!(error.contains(&part), "{part:?} not in: {error}");
    }
    assert_eq!(queue_error_gauge(&fx, "old"), 1);
    let new = fwd.group_details(&fx.iid, "new").await.unwrap();
    assert_eq!(
        (new.queue_status, new.queue_error),
        (QueueStatus::Declared, None)
    );
    // Still what they were: "old" classic, "new" quorum.
    declare(conn, &fx.queue("old"), arguments(TTL_SECS, None))
        .await
        .unwrap();
    refused_for_its_type(conn, &fx.queue("new"), arguments(TTL_SECS, None)).await;

    let (tx_old, mut rx_old) = mpsc::unbounded_channel();
    let (tx_new, mut rx_new) = mpsc::unbounded_channel();
    consume(conn, &fx.queue("old"), "old", tx_old).await;
    consume(conn, &fx.queue("new"), "new", tx_new).await;
    let mut sent = 0;
    let mut next_ids = |n: usize| {
        let range = sent..sent + n;
        sent += n;
        range
    };
    for i in next_ids(5) {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    collect(&mut rx_new, 5).await;
    collect(&mut rx_old, 5).await;
    assert_eq!(fwd.status(), AmqpStatus::Connected);
    assert_eq!(fx.metrics.forwarder_reconnects.get(), 0);
    fwd.shutdown().await;

    // A restart declares every group when it connects: the mismatch again, and on it goes.
    let fwd = open_with(&fx, QueueType::Quorum);
    eventually("connected again", || fwd.status() == AmqpStatus::Connected).await;
    let old = fwd.group_details(&fx.iid, "old").await.unwrap();
    assert_eq!(old.queue_status, QueueStatus::TypeMismatch);
    let new = fwd.group_details(&fx.iid, "new").await.unwrap();
    assert_eq!(new.queue_status, QueueStatus::Declared);
    for i in next_ids(5) {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    collect(&mut rx_new, 5).await;
    collect(&mut rx_old, 5).await;
    assert_eq!(fx.metrics.forwarder_reconnects.get(), 0);
    // Deleting the group takes its gauge away.
    fwd.delete_group(&fx.iid, "old").await.unwrap();
    assert!(!fx.metrics.encode().contains("type_mismatch"));
    fwd.shutdown().await;

    // The other way round: classic configured, "new" is a quorum queue.
    let fwd = open_with(&fx, QueueType::Classic);
    eventually("connected as classic", || {
        fwd.status() == AmqpStatus::Connected
    })
    .await;
    let new = fwd.group_details(&fx.iid, "new").await.unwrap();
    assert_eq!(new.queue_status, QueueStatus::TypeMismatch);
    let error = new.queue_error.expect("an error message");
    assert!(error.contains("amqp.queue_type = \"classic\""), "{error}");
    for i in next_ids(3) {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    collect(&mut rx_new, 3).await;
    fwd.shutdown().await;
    fx.cleanup(&["old", "new"]).await;
}

#[test]
fn the_broker_refusals_are_told_apart() {
    use groups::{classify_refusal, Refusal};
    assert_eq!(
        classify_refusal(
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': \
             received the value 'quorum' of type 'longstr' but current is none"
        ),
        Refusal::OtherType
    );
    assert_eq!(
        classify_refusal(
            "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': \
             received the value '86400000' of type 'signedint' but current is none"
        ),
        Refusal::OtherArguments
    );
    // RabbitMQ 3.8/3.9 on a quorum queue with a message TTL.
    assert_eq!(
        classify_refusal(
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'q' in vhost '/'"
        ),
        Refusal::InvalidArguments
    );
}
