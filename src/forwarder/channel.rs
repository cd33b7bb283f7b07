//! One broker-side admin operation (declare, delete, inspect) on a throwaway channel of the
//! link, bounded in time.

use super::groups::{self, Declared};
use super::{AmqpLink, QueueType};
use std::future::Future;
use std::time::Duration;

/// Bound on one broker-side admin operation (declare, delete, inspect).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

fn timed_out() -> lapin::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "AMQP operation timed out").into()
}

/// Runs one admin operation on a throwaway channel (a failed passive declare closes it).
async fn with_channel<T, F, Fut>(link: &AmqpLink, f: F) -> Result<T, lapin::Error>
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: Future<Output = Result<T, lapin::Error>>,
{
    let ch = tokio::time::timeout(ADMIN_TIMEOUT, link.conn.create_channel())
        .await
        .map_err(|_| timed_out())??;
    let out = tokio::time::timeout(ADMIN_TIMEOUT, f(ch.clone()))
        .await
        .map_err(|_| timed_out())?;
    if ch.status().connected() {
        let _ = tokio::time::timeout(ADMIN_TIMEOUT, ch.close(200, "done".into())).await;
    }
    out
}

pub(super) async fn declare_on(
    link: &AmqpLink,
    exchange: &str,
    queue: &str,
    ttl_secs: u32,
    queue_type: QueueType,
) -> Result<Declared, lapin::Error> {
    with_channel(link, |ch| async move {
        groups::declare_group(&link.conn, &ch, exchange, queue, ttl_secs, queue_type).await
    })
    .await
}

pub(super) async fn delete_on(link: &AmqpLink, queue: &str) -> Result<(), lapin::Error> {
    with_channel(
        link,
        |ch| async move { groups::delete_queue(&ch, queue).await },
    )
    .await
}

pub(super) async fn delete_exchange_on(
    link: &AmqpLink,
    exchange: &str,
) -> Result<(), lapin::Error> {
    with_channel(link, |ch| async move {
        groups::delete_exchange(&ch, exchange).await
    })
    .await
}

pub(super) async fn inspect_on(link: &AmqpLink, queue: &str) -> Result<(u32, u32), lapin::Error> {
    with_channel(
        link,
        |ch| async move { groups::inspect_queue(&ch, queue).await },
    )
    .await
}
