//! Topic isolation: device A can neither act as device B nor listen to B's topics.

use crate::helpers::*;
use rumqttc::{Packet, QoS, SubscribeReasonCode};
use std::time::Duration;

#[tokio::test]
async fn a_device_cannot_report_for_or_listen_to_another() {
    let app = spawn_app().await;
    let pk = app.create_product("iso").await;
    let secret_a = app.create_device(&pk, "dev-a").await;
    let secret_b = app.create_device(&pk, "dev-b").await;
    let mut a = connect(app.mqtt_addr(), &credentials(&pk, "dev-a", &secret_a)).await;
    let _b = connect(app.mqtt_addr(), &credentials(&pk, "dev-b", &secret_b)).await;

    // A publishes B's version report: ignored.
    a.client
        .publish(
            format!("/ota/device/inform/{pk}/dev-b"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":1,"params":{"version":"6.6.6"}}"#,
        )
        .await
        .unwrap();
    a.client
        .publish(
            format!("/ota/device/progress/{pk}/dev-b"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":1,"params":{"step":"-1","desc":"x"}}"#,
        )
        .await
        .unwrap();
    // Then its own: processed. Once A's own report shows, B's would have too.
    a.client
        .publish(
            format!("/ota/device/inform/{pk}/dev-a"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":2,"params":{"version":"1.0.0"}}"#,
        )
        .await
        .unwrap();
    app.wait_device(&pk, "dev-a", "own version", |d| {
        d["versions"]["default"] == "1.0.0"
    })
    .await;
    let b = app.device(&pk, "dev-b").await;
    assert!(
        b["versions"]
            .as_object()
            .map(|v| v.is_empty())
            .unwrap_or(true),
        "{b}"
    );

    // A cannot subscribe to B's upgrade topic, nor to wildcards spanning devices.
    for filter in [
        format!("/ota/device/upgrade/{pk}/dev-b"),
        format!("/sys/{pk}/+/thing/#"),
        "#".to_owned(),
    ] {
        a.client.subscribe(&filter, QoS::AtLeastOnce).await.unwrap();
        let ack = a
            .wait_packet("SUBACK", |p| matches!(p, Packet::SubAck(_)))
            .await;
        let Packet::SubAck(ack) = ack else {
            unreachable!()
        };
        assert_eq!(
            ack.return_codes,
            vec![SubscribeReasonCode::Failure],
            "{filter}"
        );
    }
    // Its own upgrade topic is fine.
    a.client
        .subscribe(format!("/ota/device/upgrade/{pk}/dev-a"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let ack = a
        .wait_packet("SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await;
    let Packet::SubAck(ack) = ack else {
        unreachable!()
    };
    assert!(matches!(
        ack.return_codes[0],
        SubscribeReasonCode::Success(_)
    ));

    let m = app.metrics().await;
    assert!(m.contains("fleetgate_mqtt_acl_denied_total"), "{m}");
    // A is still connected and working.
    assert!(!a.closed_within(Duration::from_millis(100)).await);
}
