//! The gateway with its store in PostgreSQL (`[store] url`): what the API and devices write
//! lands in the database and a restart on the same database finds it all back.

use crate::helpers::*;
use fleetgate::store::PostgresUrl;
use rumqttc::QoS;
use serde_json::json;

#[tokio::test]
async fn the_registry_lives_in_postgres_and_survives_a_restart() {
    let db = PgTestDatabase::create();
    let url = PostgresUrl::parse(db.url()).expect("test URL");
    let mut app = spawn_app_with(move |s| s.store.url = Some(url)).await;

    let pk = app.create_product("thermostat").await;
    let secret = app.create_device(&pk, "t-0001").await;
    let dev = connect(app.mqtt_addr(), &credentials(&pk, "t-0001", &secret)).await;
    app.wait_device(&pk, "t-0001", "online", |d| d["online"] == true)
        .await;
    dev.client
        .publish(
            format!("/ota/device/inform/{pk}/t-0001"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":1,"params":{"version":"1.2.3","module":"MCU"}}"#,
        )
        .await
        .unwrap();
    app.wait_device(&pk, "t-0001", "its version", |d| {
        d["versions"] == json!({"MCU": "1.2.3"})
    })
    .await;
    dev.client.disconnect().await.unwrap();
    app.wait_device(&pk, "t-0001", "offline", |d| d["online"] == false)
        .await;

    // In PostgreSQL, and no SQLite store beside it.
    assert_eq!(
        db.query_i64(
            "SELECT COUNT(*) FROM device_versions WHERE device_name = 't-0001' AND version = '1.2.3'"
        ),
        1
    );
    assert_eq!(
        db.query_i64("SELECT COUNT(*) FROM devices WHERE last_seen_ms > 0"),
        1
    );
    assert!(!app.data_dir().join("fleetgate.db").exists());

    app.restart().await;
    let d = app.device(&pk, "t-0001").await;
    assert_eq!(d["versions"], json!({"MCU": "1.2.3"}));
    assert_eq!(app.device_secret(&pk, "t-0001").await, secret);
    assert_eq!(d["online"], false);
    assert!(d["last_seen_ms"].as_i64().unwrap() > 0);
    let (status, product) = app.get(&format!("/api/v1/products/{pk}")).await;
    assert_eq!(status, 200, "{product}");
    assert_eq!(product["name"], "thermostat");
    // The same secret still works after the restart.
    let _dev = connect(app.mqtt_addr(), &credentials(&pk, "t-0001", &secret)).await;
    app.wait_device(&pk, "t-0001", "online again", |d| d["online"] == true)
        .await;
    app.stop().await;
}
