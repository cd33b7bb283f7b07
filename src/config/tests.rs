//! Unit tests of the settings: defaults, file and override precedence, validation errors,
//! section parsing and the startup summary.

use super::*;

#[test]
fn defaults_match_the_design() {
    let s = Settings::load(None, Overrides::default()).unwrap();
    assert_eq!(s.mqtt.listen.port(), 1883);
    assert_eq!(s.http.listen.port(), 8080);
    assert_eq!(s.data_dir, PathBuf::from("./fleetgate-data"));
    assert!(s.amqp.url.is_none());
    assert_eq!(s.ota.max_firmware_bytes, 256 * 1024 * 1024);
    assert_eq!(s.ota.download_url_ttl_secs, 86_400);
}

#[test]
fn only_built_in_listen_addresses_may_fall_back() {
    let s = Settings::load(None, Overrides::default()).unwrap();
    assert!(s.mqtt.listen_is_default && s.http.listen_is_default);
    // A flag or environment variable (both arrive as overrides), even naming the default.
    let s = Settings::load(
        None,
        Overrides {
            mqtt_listen: Some("0.0.0.0:1883".parse().unwrap()),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert!(!s.mqtt.listen_is_default && s.http.listen_is_default);
    // The config file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    std::fs::write(&path, "[http]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert!(s.mqtt.listen_is_default && !s.http.listen_is_default);
    // Settings built in code bind what they say.
    assert!(!Settings::default().mqtt.listen_is_default);
    assert!(!Settings::default().http.listen_is_default);
}

#[test]
fn export_unpack_limits_from_file_and_checked() {
    let s = Settings::load(None, Overrides::default()).unwrap();
    assert_eq!(s.export.max_unpacked_entry_bytes, 256 * 1024 * 1024);
    assert_eq!(s.export.max_unpacked_bytes, 1024 * 1024 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    std::fs::write(
        &path,
        "[export]\nmax_unpacked_entry_bytes = 1000\nmax_unpacked_bytes = 5000\n",
    )
    .unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert_eq!(
        (
            s.export.max_unpacked_entry_bytes,
            s.export.max_unpacked_bytes
        ),
        (1000, 5000)
    );
    for (toml, field) in [
        (
            "max_unpacked_entry_bytes = 0",
            "export.max_unpacked_entry_bytes",
        ),
        (
            "max_unpacked_entry_bytes = 1000\nmax_unpacked_bytes = 999",
            "export.max_unpacked_bytes",
        ),
    ] {
        std::fs::write(&path, format!("[export]\n{toml}\n")).unwrap();
        match Settings::load(Some(&path), Overrides::default()) {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{toml}: {other:?}"),
        }
    }
}

#[test]
fn ota_section_from_file_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    std::fs::write(
        &path,
        "[ota]\nmax_firmware_bytes = 1048576\ndownload_url_ttl_secs = 600\n",
    )
    .unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert_eq!(s.ota.max_firmware_bytes, 1_048_576);
    assert_eq!(s.ota.download_url_ttl_secs, 600);
    std::fs::write(&path, "[ota]\ndownload_url_ttl_secs = 5\n").unwrap();
    assert!(matches!(
        Settings::load(Some(&path), Overrides::default()),
        Err(ConfigError::Invalid {
            field: "ota.download_url_ttl_secs",
            ..
        })
    ));
    std::fs::write(&path, "[ota]\nmax_firmware_bytes = 0\n").unwrap();
    assert!(matches!(
        Settings::load(Some(&path), Overrides::default()),
        Err(ConfigError::Invalid {
            field: "ota.max_firmware_bytes",
            ..
        })
    ));
}

#[test]
fn http_body_limits_from_file_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    let load = |toml: &str| {
        std::fs::write(&path, toml).unwrap();
        Settings::load(Some(&path), Overrides::default())
    };
    let d = Settings::default().http;
    assert_eq!(
        (d.json_body_limit_bytes, d.batch_body_limit_bytes),
        (1024 * 1024, 16 * 1024 * 1024)
    );
    let s = load(
        "[http]
json_body_limit_bytes = 65536
batch_body_limit_bytes = 2097152
",
    )
    .unwrap();
    assert_eq!(s.http.json_body_limit_bytes, 65_536);
    assert_eq!(s.http.batch_body_limit_bytes, 2_097_152);
    for (toml, field) in [
        (
            "[http]
json_body_limit_bytes = 10
",
            "http.json_body_limit_bytes",
        ),
        (
            "[http]
batch_body_limit_bytes = 0
",
            "http.batch_body_limit_bytes",
        ),
    ] {
        assert!(
            matches!(load(toml), Err(ConfigError::Invalid { field: f, .. }) if f == field),
            "{toml}"
        );
    }
    // The single limit of old releases is gone: a file still naming it fails loudly
    // instead of silently getting other limits.
    let e = load(
        "[http]
body_limit_bytes = 67108864
",
    )
    .unwrap_err();
    assert!(
        matches!(&e, ConfigError::Parse { .. }) && e.to_string().contains("json_body_limit_bytes"),
        "{e}"
    );
}

#[test]
fn store_section_from_file_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    let load = |toml: &str| {
        std::fs::write(&path, toml).unwrap();
        Settings::load(Some(&path), Overrides::default())
    };
    let s = load("[store]\nsynchronous = \"normal\"\ncommit_delay_us = 0\ncommit_siblings = 3\n")
        .unwrap();
    assert_eq!(s.store.synchronous, crate::store::Synchronous::Normal);
    assert_eq!(s.store.commit_delay_us, Some(0));
    assert_eq!(s.store.commit_delay(), 0);
    assert_eq!(s.store.commit_siblings, 3);
    assert_eq!(
        Settings::default().store,
        crate::store::StoreSettings {
            url: None,
            synchronous: crate::store::Synchronous::Full,
            commit_delay_us: None,
            commit_siblings: 8
        }
    );
    // Unset, the delay is the backend's: 2 ms on SQLite, 4 ms on PostgreSQL.
    assert_eq!(Settings::default().store.commit_delay(), 2_000);
    let pg = load("[store]\nurl = \"postgres://db/fg\"\n").unwrap();
    assert_eq!(pg.store.commit_delay(), 4_000);
    let pg = load("[store]\nurl = \"postgres://db/fg\"\ncommit_delay_us = 1500\n").unwrap();
    assert_eq!(pg.store.commit_delay(), 1_500);
    assert!(load("[store]\nsynchronous = \"off\"\n").is_err());
    for (toml, field) in [
        (
            "[store]\ncommit_delay_us = 100001\n",
            "store.commit_delay_us",
        ),
        ("[store]\ncommit_siblings = 0\n", "store.commit_siblings"),
        (
            "[store]\nurl = \"postgres://db/fg\"\nsynchronous = \"normal\"\n",
            "store.synchronous",
        ),
    ] {
        assert!(
            matches!(load(toml), Err(ConfigError::Invalid { field: f, .. }) if f == field),
            "{toml}"
        );
    }
}

#[test]
fn the_store_url_picks_postgres_and_is_checked_where_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    let data_dir = PathBuf::from("/var/lib/fg");
    assert_eq!(
        Settings::default().store.location(&data_dir),
        crate::store::StoreLocation::Sqlite(data_dir.join("fleetgate.db"))
    );

    std::fs::write(
        &path,
        "[store]\nurl = \"postgres://fg:pw@db:5432/fleetgate\"\n",
    )
    .unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    let location = s.store.location(&data_dir);
    assert_eq!(
        location.to_string(),
        "PostgreSQL at postgres://fg:***@db:5432/fleetgate"
    );
    assert!(!format!("{s:?}").contains("pw@"));

    // The flag (or FLEETGATE_STORE) wins over the file.
    let o = Overrides {
        store_url: Some("postgresql://other/fg".into()),
        ..Default::default()
    };
    let s = Settings::load(Some(&path), o).unwrap();
    assert_eq!(
        s.store.url.as_ref().map(|u| u.expose()),
        Some("postgresql://other/fg")
    );

    let o = Overrides {
        store_url: Some("/var/lib/fg/fleetgate.db".into()),
        ..Default::default()
    };
    assert!(matches!(
        Settings::load(None, o),
        Err(ConfigError::Invalid { field: "store.url", message }) if message.contains("postgres://")
    ));
    std::fs::write(&path, "[store]\nurl = \"postgres://fg:pw@db:x/fg\"\n").unwrap();
    match Settings::load(Some(&path), Overrides::default()) {
        Err(e @ ConfigError::Parse { .. }) => {
            let message = e.to_string();
            assert!(message.contains("(line 2, column 7)"), "{message}");
            assert!(message.contains("invalid PostgreSQL URL"), "{message}");
            assert!(!message.contains("pw@"), "{message}");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn mqtt_limits_from_file_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    let load = |toml: &str, o: Overrides| {
        std::fs::write(&path, toml).unwrap();
        Settings::load(Some(&path), o)
    };
    let d = Settings::default().mqtt;
    assert_eq!(
        (
            d.max_subscriptions_per_device,
            d.max_modules_per_device,
            d.connect_timestamp_window()
        ),
        (50, 64, None)
    );
    let s = load(
        "[mqtt]\nmax_subscriptions_per_device = 8\nmax_modules_per_device = 4\n\
             connect_timestamp_window_secs = 300\n",
        Overrides::default(),
    )
    .unwrap();
    assert_eq!(s.mqtt.max_subscriptions_per_device, 8);
    assert_eq!(s.mqtt.max_modules_per_device, 4);
    assert_eq!(
        s.mqtt.connect_timestamp_window(),
        Some(std::time::Duration::from_secs(300))
    );
    // Environment/flags win over the file.
    let o = Overrides {
        mqtt_max_subscriptions_per_device: Some(9),
        mqtt_max_modules_per_device: Some(5),
        mqtt_connect_timestamp_window_secs: Some(0),
        ..Default::default()
    };
    let s = load("[mqtt]\nconnect_timestamp_window_secs = 300\n", o).unwrap();
    assert_eq!(s.mqtt.max_subscriptions_per_device, 9);
    assert_eq!(s.mqtt.max_modules_per_device, 5);
    assert_eq!(s.mqtt.connect_timestamp_window(), None);
    for (toml, field) in [
        (
            "[mqtt]\nmax_subscriptions_per_device = 0\n",
            "mqtt.max_subscriptions_per_device",
        ),
        (
            "[mqtt]\nmax_modules_per_device = 0\n",
            "mqtt.max_modules_per_device",
        ),
        (
            "[mqtt]\nconnect_timestamp_window_secs = 4294967296\n",
            "mqtt.connect_timestamp_window_secs",
        ),
    ] {
        assert!(
            matches!(load(toml, Overrides::default()), Err(ConfigError::Invalid { field: f, .. }) if f == field),
            "{toml}"
        );
    }
}

#[test]
fn file_then_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    std::fs::write(
            &path,
            "data_dir = \"/var/lib/fg\"\n[mqtt]\nlisten = \"127.0.0.1:1999\"\n[http]\nlisten = \"127.0.0.1:8999\"\n",
        )
        .unwrap();
    let o = Overrides {
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let s = Settings::load(Some(&path), o).unwrap();
    assert_eq!(s.mqtt.listen, "127.0.0.1:1999".parse().unwrap());
    assert_eq!(s.http.listen, "127.0.0.1:0".parse().unwrap());
    assert_eq!(s.data_dir, PathBuf::from("/var/lib/fg"));
}

#[test]
fn bad_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    std::fs::write(&path, "[mqtt]\nlisten = \"nope\"\n").unwrap();
    assert!(matches!(
        Settings::load(Some(&path), Overrides::default()),
        Err(ConfigError::Parse { .. })
    ));
    std::fs::write(&path, "[mqtt]\nlistn = \"127.0.0.1:1\"\n").unwrap();
    assert!(matches!(
        Settings::load(Some(&path), Overrides::default()),
        Err(ConfigError::Parse { .. })
    ));
    let o = Overrides {
        amqp_url: Some("http://x".into()),
        ..Default::default()
    };
    assert!(matches!(
        Settings::load(None, o),
        Err(ConfigError::Invalid {
            field: "amqp.url",
            ..
        })
    ));
    let o = Overrides {
        tls_cert: Some("c.pem".into()),
        ..Default::default()
    };
    assert!(matches!(
        Settings::load(None, o),
        Err(ConfigError::Invalid {
            field: "mqtt.tls",
            ..
        })
    ));
}

#[test]
fn amqp_section_reaches_the_forwarder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    std::fs::write(
        &path,
        "[amqp]\nurl = \"amqp://u:p@127.0.0.1:5672/%2f\"\noutbox_max_bytes = 1048576\n\
             inflight_window = 512\nrate_limit_msgs_per_sec = 100\nexchange_prefix = \"fg\"\n\
             queue_message_ttl_secs = 3600\n",
    )
    .unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    let f = crate::forwarder::ForwarderConfig::new(s.amqp).unwrap();
    assert_eq!(
        f.url.as_ref().map(Secret::expose),
        Some("amqp://u:p@127.0.0.1:5672/%2f")
    );
    assert_eq!((f.outbox_max_bytes, f.inflight_window), (1_048_576, 512));
    assert_eq!(f.rate_limit_msgs_per_sec, Some(100));
    assert_eq!(f.exchange_prefix, "fg");
    assert_eq!(f.queue_message_ttl_secs, 3600);
    assert_eq!(f.queue_type, QueueType::Classic, "the default");
    assert_eq!(f.reconnect_max_ms, AmqpSettings::default().reconnect_max_ms);
    std::fs::write(&path, "[amqp]\ninflight_window = 0\n").unwrap();
    assert!(matches!(
        Settings::load(Some(&path), Overrides::default()),
        Err(ConfigError::Invalid {
            field: "amqp.inflight_window",
            ..
        })
    ));
    // The queue type: from the file, then the environment or flag over it; a type RabbitMQ
    // has but fleetgate does not declare (streams) is refused, naming it.
    std::fs::write(&path, "[amqp]\nqueue_type = \"quorum\"\n").unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert_eq!(s.amqp.queue_type, QueueType::Quorum);
    let s = Settings::load(
        Some(&path),
        Overrides {
            amqp_queue_type: Some(QueueType::Classic),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(s.amqp.queue_type, QueueType::Classic);
    assert_eq!("quorum".parse::<QueueType>(), Ok(QueueType::Quorum));
    assert!("stream"
        .parse::<QueueType>()
        .unwrap_err()
        .contains("classic or quorum"));
    std::fs::write(&path, "[amqp]\nqueue_type = \"stream\"\n").unwrap();
    let e = Settings::load(Some(&path), Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("stream"), "{e}");
    std::fs::write(&path, "[amqp]\nqueue_message_ttl_secs = 4294968\n").unwrap();
    assert!(matches!(
        Settings::load(Some(&path), Overrides::default()),
        Err(ConfigError::Invalid {
            field: "amqp.queue_message_ttl_secs",
            ..
        })
    ));
}

#[test]
fn limits_from_file_and_overrides_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    let d = Settings::default();
    assert_eq!(d.open_files_reserve, 128);
    assert_eq!(
        (d.mqtt.max_sockets, d.mqtt.max_unauthenticated_per_ip),
        (None, None)
    );
    assert_eq!(
        (
            d.mqtt.pressure_unauthenticated,
            d.mqtt.connect_timeout_under_pressure_secs
        ),
        (None, 2)
    );
    assert_eq!(
        (d.http.max_connections, d.http.max_connections_per_ip),
        (None, None)
    );
    assert_eq!(
        (
            d.http.header_read_timeout_secs,
            d.http.body_read_timeout_secs,
            d.http.write_timeout_secs
        ),
        (10, 30, 30)
    );

    std::fs::write(
        &path,
        "open_files_reserve = 512
[mqtt]
max_sockets = 5000
max_unauthenticated_per_ip = 8
             pressure_unauthenticated = 100
connect_timeout_under_pressure_secs = 1
             [http]
max_connections = 50
max_connections_per_ip = 4
             header_read_timeout_secs = 3
body_read_timeout_secs = 4
write_timeout_secs = 5
",
    )
    .unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert_eq!(s.open_files_reserve, 512);
    assert_eq!(s.mqtt.max_sockets, Some(5000));
    assert_eq!(s.mqtt.max_unauthenticated_per_ip, Some(8));
    assert_eq!(s.mqtt.pressure_unauthenticated, Some(100));
    assert_eq!(s.mqtt.connect_timeout_under_pressure_secs, 1);
    assert_eq!(s.http.max_connections, Some(50));
    assert_eq!(s.http.max_connections_per_ip, Some(4));
    assert_eq!(
        (
            s.http.header_read_timeout_secs,
            s.http.body_read_timeout_secs,
            s.http.write_timeout_secs
        ),
        (3, 4, 5)
    );

    // Flags and env vars win over the file.
    let o = Overrides {
        open_files_reserve: Some(300),
        mqtt_max_sockets: Some(7),
        mqtt_max_unauthenticated_per_ip: Some(2),
        mqtt_pressure_unauthenticated: Some(3),
        mqtt_connect_timeout_under_pressure_secs: Some(2),
        http_max_connections: Some(9),
        http_max_connections_per_ip: Some(1),
        http_header_read_timeout_secs: Some(6),
        http_body_read_timeout_secs: Some(7),
        http_write_timeout_secs: Some(8),
        ..Default::default()
    };
    let s = Settings::load(Some(&path), o).unwrap();
    assert_eq!(s.open_files_reserve, 300);
    assert_eq!(
        (
            s.mqtt.max_sockets,
            s.mqtt.max_unauthenticated_per_ip,
            s.mqtt.pressure_unauthenticated,
            s.mqtt.connect_timeout_under_pressure_secs
        ),
        (Some(7), Some(2), Some(3), 2)
    );
    assert_eq!(
        (
            s.http.max_connections,
            s.http.max_connections_per_ip,
            s.http.header_read_timeout_secs,
            s.http.body_read_timeout_secs,
            s.http.write_timeout_secs
        ),
        (Some(9), Some(1), 6, 7, 8)
    );

    for (toml, field) in [
        (
            "[mqtt]
max_sockets = 0
",
            "mqtt.max_sockets",
        ),
        (
            "[mqtt]
max_unauthenticated_per_ip = 0
",
            "mqtt.max_unauthenticated_per_ip",
        ),
        (
            "[mqtt]
pressure_unauthenticated = 0
",
            "mqtt.pressure_unauthenticated",
        ),
        (
            "[mqtt]
connect_timeout_secs = 5
connect_timeout_under_pressure_secs = 6
",
            "mqtt.connect_timeout_under_pressure_secs",
        ),
        (
            "[mqtt]
connect_timeout_secs = 0
",
            "mqtt.connect_timeout_secs",
        ),
        (
            "[http]
max_connections = 0
",
            "http.max_connections",
        ),
        (
            "[http]
max_connections_per_ip = 0
",
            "http.max_connections_per_ip",
        ),
        (
            "[http]
header_read_timeout_secs = 0
",
            "http.header_read_timeout_secs",
        ),
        (
            "[http]
body_read_timeout_secs = 3601
",
            "http.body_read_timeout_secs",
        ),
        (
            "[http]
write_timeout_secs = 0
",
            "http.write_timeout_secs",
        ),
        (
            "open_files_reserve = 31
",
            "open_files_reserve",
        ),
    ] {
        std::fs::write(&path, toml).unwrap();
        let r = Settings::load(Some(&path), Overrides::default());
        assert!(
            matches!(r, Err(ConfigError::Invalid { field: f, .. }) if f == field),
            "{toml}: {r:?}"
        );
    }
}

#[test]
fn proxy_protocol_from_file_and_overrides_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fg.toml");
    // The same settings on both listeners; each listener's are its own.
    for section in ["mqtt", "http"] {
        std::fs::write(
            &path,
            format!(
                "[{section}]\nproxy_protocol = \"required\"\n\
                 proxy_trusted = [\"10.0.0.5\", \"10.0.1.9/24\"]\n"
            ),
        )
        .unwrap();
        let s = Settings::load(Some(&path), Overrides::default()).unwrap();
        let (policy, other) = match section {
            "mqtt" => (s.mqtt.proxy_policy(), s.http.proxy_policy()),
            _ => (s.http.proxy_policy(), s.mqtt.proxy_policy()),
        };
        assert_eq!(policy.mode, ProxyMode::Required, "{section}");
        assert_eq!(
            other,
            crate::proxy_protocol::ProxyPolicy::default(),
            "{section}"
        );
        let trusted: Vec<String> = policy.trusted.iter().map(|n| n.to_string()).collect();
        assert_eq!(trusted, ["10.0.0.5/32", "10.0.1.0/24"]);
        assert!(
            summary(&s).iter().any(|l| l
                == &format!("{section} PROXY protocol required from 10.0.0.5/32, 10.0.1.0/24")),
            "{section}: {:?}",
            summary(&s)
        );
        // Turned on without a balancer to trust; a bad address; a bad mode.
        for (toml, error) in [
            (
                "proxy_protocol = \"trusted\"",
                format!("{section}.proxy_trusted"),
            ),
            (
                "proxy_protocol = \"required\"\nproxy_trusted = [\"10.0.0.0/33\"]",
                "neither an IP address".into(),
            ),
            ("proxy_protocol = \"v2\"", "unknown variant".into()),
        ] {
            std::fs::write(&path, format!("[{section}]\n{toml}\n")).unwrap();
            let e = Settings::load(Some(&path), Overrides::default()).unwrap_err();
            assert!(e.to_string().contains(&error), "{section} {toml}: {e}");
        }
    }
    // The environment and flags win over the file.
    std::fs::write(
        &path,
        "[mqtt]\nproxy_protocol = \"required\"\nproxy_trusted = [\"10.0.0.5\"]\n\
         [http]\nproxy_protocol = \"required\"\nproxy_trusted = [\"10.0.0.6\"]\n",
    )
    .unwrap();
    let s = Settings::load(
        Some(&path),
        Overrides {
            mqtt_proxy_protocol: Some(ProxyMode::Trusted),
            mqtt_proxy_trusted: Some(vec!["127.0.0.3".parse().unwrap()]),
            http_proxy_protocol: Some(ProxyMode::Trusted),
            http_proxy_trusted: Some(vec!["127.0.0.4".parse().unwrap()]),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(s.mqtt.proxy_protocol, ProxyMode::Trusted);
    assert_eq!(s.mqtt.proxy_trusted, ["127.0.0.3".parse().unwrap()]);
    assert_eq!(s.http.proxy_protocol, ProxyMode::Trusted);
    assert_eq!(s.http.proxy_trusted, ["127.0.0.4".parse().unwrap()]);
}

#[test]
fn secrets_do_not_leak_in_debug() {
    let o = Overrides {
        api_token: Some("super-secret-token-value".into()),
        ..Default::default()
    };
    let s = Settings::load(None, o).unwrap();
    assert!(!format!("{s:?}").contains("super-secret"));
}

/// `fleetgate.example.toml` is the defaults, key for key: every key that has a default is
/// in it with that value and nothing else is, and the keys shown commented out (those
/// without a default) are real keys of the right type.
#[test]
fn the_example_file_is_every_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fleetgate.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let defaults = toml::Value::try_from(Settings::default()).unwrap();
    let file: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(
        file,
        defaults,
        "fleetgate.example.toml differs from Settings::default(); the defaults are:\n{}",
        toml::to_string_pretty(&Settings::default()).unwrap()
    );
    let loaded = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert_eq!(toml::Value::try_from(&loaded).unwrap(), defaults);

    // Uncommented, the optional keys still parse (deny_unknown_fields names any typo).
    let uncommented: String = text
        .lines()
        .filter(|l| *l != "tokens = []")
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if (rest.starts_with('[') && !rest.contains(' '))
                    || rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
            {
                rest
            }
            _ => l,
        })
        .fold(String::new(), |mut out, l| {
            out.push_str(l);
            out.push('\n');
            out
        });
    let all: Settings =
        toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    assert!(all.mqtt.tls.is_some() && all.mqtt.max_sockets.is_some());
    assert!(all.http.public_url.is_some() && all.http.max_connections_per_ip.is_some());
    assert!(all.amqp.url.is_some() && all.amqp.rate_limit_bytes_per_sec.is_some());
    assert_eq!(all.api.tokens.len(), 1);
    assert!(all.api.token.is_some() && all.store.url.is_some());
    assert!(all.cluster.nats_url.is_some());
}
