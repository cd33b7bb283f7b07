//! Start-up on a machine where the listen ports are taken: a built-in default port falls back
//! to the next free one, an address the operator gave is a hard error naming its flag, and a
//! start that fails creates no admin token.

use crate::helpers::*;
use fleetgate::app::Application;
use fleetgate::config::{Overrides, Settings};
use std::net::{SocketAddr, TcpListener};

fn hold_port() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

#[tokio::test]
async fn taken_default_ports_fall_back_to_free_ones() {
    let (_mqtt_held, mqtt_taken) = hold_port();
    let (_http_held, http_taken) = hold_port();
    // As `Settings::load` marks the built-in defaults, on ports the test holds.
    let t = spawn_app_with(|s| {
        s.mqtt.listen = mqtt_taken;
        s.mqtt.listen_is_default = true;
        s.http.listen = http_taken;
        s.http.listen_is_default = true;
    })
    .await;
    let (mqtt, http) = (t.mqtt_addr(), t.app().http_addr());
    assert!(mqtt.port() > mqtt_taken.port(), "{mqtt} for {mqtt_taken}");
    assert!(http.port() > http_taken.port(), "{http} for {http_taken}");
    // /healthz reports the addresses in use (the simulator asks it for the MQTT one).
    let body: serde_json::Value = t
        .http
        .get(t.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["mqtt"], mqtt.to_string());
    assert_eq!(body["http"], http.to_string());
}

#[tokio::test]
async fn a_taken_explicit_port_fails_naming_the_flag_and_creates_no_token() {
    for taken_is_mqtt in [true, false] {
        let (_held, taken) = hold_port();
        let dir = tempfile::tempdir().unwrap();
        let free: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (mqtt, http) = if taken_is_mqtt {
            (taken, free)
        } else {
            (free, taken)
        };
        let settings = Settings::load(
            None,
            Overrides {
                mqtt_listen: Some(mqtt),
                http_listen: Some(http),
                data_dir: Some(dir.path().to_owned()),
                ..Default::default()
            },
        )
        .unwrap();
        let err = match Application::build(settings.clone()).await {
            Ok(_) => panic!("started on the taken {taken}"),
            Err(e) => format!("{e:#}"),
        };
        let flag = if taken_is_mqtt {
            "--mqtt-listen"
        } else {
            "--http-listen"
        };
        assert!(err.contains(flag), "{err}");
        assert!(err.contains(&taken.to_string()), "{err}");
        assert!(
            !dir.path().join("api-token").exists(),
            "a failed start created the admin token"
        );

        // Once the port is free the next start creates (and reports) the token.
        drop(_held);
        let app = Application::build(settings).await.unwrap();
        let token = app.created_admin_token().expect("token created").to_owned();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("api-token"))
                .unwrap()
                .trim(),
            token
        );
        app.shutdown().await.unwrap();
    }
}
