//! Test support shared by the library's tests and the integration tests: finding the test
//! RabbitMQ and the bare-publisher baseline of the benchmarks. Not part of the gateway's API.

use futures_util::StreamExt;
use std::time::Duration;

/// The default test broker.
pub const DEFAULT_TEST_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The URL of the test RabbitMQ (`FLEETGATE_AMQP_URL`, else [`DEFAULT_TEST_AMQP_URL`]) when it
/// accepts an AMQP connection. When it does not: panics if env `CI` is set (CI must have a
/// broker), else prints `SKIPPED {test}: …` and returns `None` so the test can return early.
pub async fn amqp_url_or_skip(test: &str) -> Option<String> {
    let url = std::env::var("FLEETGATE_AMQP_URL").unwrap_or_else(|_| DEFAULT_TEST_AMQP_URL.into());
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
    )
    .await;
    let error = match attempt {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "probe".into()).await;
            return Some(url);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "connect timed out".to_owned(),
    };
    if std::env::var_os("CI").is_some() {
        panic!("RabbitMQ unreachable (FLEETGATE_AMQP_URL) and CI is set: {error}");
    }
    eprintln!("SKIPPED {test}: RabbitMQ unreachable (set FLEETGATE_AMQP_URL): {error}");
    None
}

/// Publishes `n` copies of `body` with 1,000 confirms in flight; returns messages per second.
pub async fn bare_publish(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    n: usize,
    body: &[u8],
    props: impl Fn(usize) -> lapin::BasicProperties,
) -> f64 {
    let started = std::time::Instant::now();
    let mut inflight = futures_util::stream::FuturesUnordered::new();
    let mut acked = 0usize;
    for i in 0..n {
        if inflight.len() >= 1000 {
            if let Some(c) = inflight.next().await {
                let c: lapin::Result<lapin::Confirmation> = c;
                assert!(c.unwrap().is_ack());
                acked += 1;
            }
        }
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                body,
                props(i),
            )
            .await
            .unwrap();
        inflight.push(confirm);
    }
    while let Some(c) = inflight.next().await {
        assert!(c.unwrap().is_ack());
        acked += 1;
    }
    assert_eq!(acked, n);
    n as f64 / started.elapsed().as_secs_f64()
}
