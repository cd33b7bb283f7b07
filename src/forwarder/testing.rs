//! Test support shared by the library's tests and the integration tests: finding the test
//! RabbitMQ. Not part of the gateway's API.

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
