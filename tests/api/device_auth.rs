//! Link CONNECT authentication end to end: every sign method, with and without timestamps,
//! and every refusal with its CONNACK code and metric.

use crate::helpers::*;
use fleetgate_topics::sign::{LinkCredentials, SignMethod};
use rumqttc::ConnectReturnCode;
use serde_json::json;

#[tokio::test]
async fn every_sign_method_connects() {
    let app = spawn_app().await;
    let pk = app.create_product("auth").await;
    let secret = app.create_device(&pk, "dev-auth").await;
    let millis = "1700000000123".to_owned();
    let secs = "1700000000".to_owned();
    for method in SignMethod::ALL {
        for ts in [None, Some(secs.clone()), Some(millis.clone())] {
            for secure_mode in [2, 3] {
                let creds =
                    LinkCredentials::new(&pk, "dev-auth", &secret, method, secure_mode, ts.clone());
                let dev = try_connect(app.mqtt_addr(), &creds).await;
                assert!(
                    dev.is_ok(),
                    "{method} ts={ts:?} securemode={secure_mode}: {:?}",
                    dev.err()
                );
                let dev = dev.unwrap();
                dev.client.disconnect().await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn refusals_have_real_codes_and_are_counted() {
    let app = spawn_app().await;
    let pk = app.create_product("auth").await;
    let secret = app.create_device(&pk, "dev-ok").await;
    app.create_device(&pk, "dev-off").await;
    let (status, body) = app
        .request(
            reqwest::Method::PATCH,
            &format!("/api/v1/products/{pk}/devices/dev-off"),
            Some(json!({ "enabled": false })),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Wrong secret.
    let bad = credentials(&pk, "dev-ok", "not-the-secret");
    assert_eq!(
        try_connect(app.mqtt_addr(), &bad).await.err(),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    // Unknown device.
    let unknown = credentials(&pk, "dev-nobody", &secret);
    assert_eq!(
        try_connect(app.mqtt_addr(), &unknown).await.err(),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    // Disabled device with its right secret.
    let off = credentials(&pk, "dev-off", &app.device_secret(&pk, "dev-off").await);
    assert_eq!(
        try_connect(app.mqtt_addr(), &off).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    // Malformed client id (no |params|).
    let mut malformed = credentials(&pk, "dev-ok", &secret);
    malformed.client_id = "just-a-client-id".into();
    assert!(try_connect(app.mqtt_addr(), &malformed).await.is_err());

    let m = app.metrics().await;
    for reason in [
        "bad_signature",
        "unknown_device",
        "disabled_device",
        "malformed_client_id",
    ] {
        let line = format!("fleetgate_mqtt_connects_refused_total{{reason=\"{reason}\"}} 1");
        assert!(m.contains(&line), "missing `{line}` in\n{m}");
    }
    // The good device still connects afterwards.
    connect(app.mqtt_addr(), &credentials(&pk, "dev-ok", &secret)).await;
}

#[tokio::test]
async fn a_second_connect_of_the_device_ends_the_first_whatever_its_client_id() {
    use fleetgate_topics::sign::LinkClientId;
    let app = spawn_app().await;
    let pk = app.create_product("one connection").await;
    let secret = app.create_device(&pk, "dev-once").await;
    let with_id = |client_id: &str| {
        let id = LinkClientId {
            client_id: client_id.to_owned(),
            secure_mode: 3,
            sign_method: SignMethod::HmacSha256,
            timestamp: None,
            auto_subscribe: false,
        };
        LinkCredentials {
            client_id: id.to_client_id_string(),
            username: format!("dev-once&{pk}"),
            password: id.password(&pk, "dev-once", &secret),
        }
    };
    let mut first = connect(app.mqtt_addr(), &with_id("bench-a")).await;
    let mut second = connect(app.mqtt_addr(), &with_id("bench-b")).await;
    assert!(
        first.closed_within(WAIT).await,
        "the first connection stays open"
    );
    assert!(
        !second
            .closed_within(std::time::Duration::from_millis(300))
            .await
    );
    assert_eq!(app.device(&pk, "dev-once").await["online"], true);
}
