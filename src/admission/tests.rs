//! The connection budgets table, the admission decision and the connection gate.

use super::*;

const MIB: u64 = 1024 * 1024;

fn settings(reserve: u64) -> BudgetSettings {
    BudgetSettings {
        reserve,
        ..BudgetSettings::default()
    }
}

/// One row of the budget table: what [`Budgets::derive`] must give.
struct Row {
    open_files: u64,
    settings: BudgetSettings,
    mqtt: usize,
    http: usize,
    pressure: usize,
    mqtt_per_ip: usize,
    http_per_ip: usize,
    lowered: &'static [&'static str],
}

#[test]
fn budgets_split_the_open_files_limit() {
    let row =
        |open_files, settings, [mqtt, http, pressure, mqtt_per_ip, http_per_ip]: [usize; 5]| Row {
            open_files,
            settings,
            mqtt,
            http,
            pressure,
            mqtt_per_ip,
            http_per_ip,
            lowered: &[],
        };
    let huge = usize::MAX - 128 - 2048;
    let rows = [
        // A distribution's default limit: HTTP gets an eighth of what is left, the
        // per-source caps a quarter of their budgets.
        row(1024, settings(128), [672, 112, 84, 168, 28]),
        row(20_000, settings(128), [17_824, 1024, 2228, 512, 256]),
        row(65_536, settings(128), [63_360, 1024, 7920, 512, 256]),
        row(MIB, settings(128), [1_046_400, 1024, 130_800, 512, 256]),
        // Just enough beyond the reserve.
        row(192, settings(128), [48, 8, 6, 12, 2]),
        // An unlimited limit does not overflow.
        row(u64::MAX, settings(128), [huge, 1024, huge / 8, 512, 256]),
        // Configured values that fit are taken as they are.
        row(
            65_536,
            BudgetSettings {
                reserve: 256,
                mqtt_sockets: Some(5000),
                http_connections: Some(64),
                mqtt_pressure: Some(100),
                mqtt_per_ip: Some(7),
                http_per_ip: Some(3),
            },
            [5000, 64, 100, 7, 3],
        ),
        // Too much HTTP is lowered to half of what is available (2 files each); MQTT gets
        // the rest.
        Row {
            lowered: &["http.max_connections"],
            ..row(
                1024,
                BudgetSettings {
                    http_connections: Some(10_000),
                    ..settings(128)
                },
                [448, 224, 56, 112, 56],
            )
        },
        // Too much MQTT is lowered to what HTTP and the reserve leave.
        Row {
            lowered: &["mqtt.max_sockets"],
            ..row(
                1024,
                BudgetSettings {
                    mqtt_sockets: Some(100_000),
                    http_connections: Some(10),
                    ..settings(128)
                },
                [876, 10, 109, 219, 2],
            )
        },
    ];
    for r in rows {
        let (b, low) = Budgets::derive(r.open_files, &r.settings).unwrap();
        let what = format!("{} files, {:?}: {b:?}", r.open_files, r.settings);
        assert_eq!(
            [
                b.mqtt_sockets,
                b.http_connections,
                b.mqtt_pressure,
                b.mqtt_per_ip,
                b.http_per_ip
            ],
            [r.mqtt, r.http, r.pressure, r.mqtt_per_ip, r.http_per_ip],
            "{what}"
        );
        assert_eq!(
            low.iter().map(|l| l.setting).collect::<Vec<_>>(),
            r.lowered,
            "{what}"
        );
        // Whatever was asked, the reserve stays free.
        let used =
            b.mqtt_sockets as u128 + b.http_connections as u128 * HTTP_FILES_PER_CONNECTION as u128;
        assert!(
            used + u128::from(b.reserve) <= u128::from(r.open_files),
            "{what}"
        );
    }
}

#[test]
fn too_few_files_beyond_the_reserve_is_an_error() {
    for (open_files, reserve) in [(256, 256), (319, 256), (100, 256), (63, 0)] {
        assert!(
            matches!(
                Budgets::derive(open_files, &settings(reserve)),
                Err(AdmissionError::TooFewFiles { .. })
            ),
            "{open_files}/{reserve}"
        );
    }
}

#[test]
fn decide_checks_the_source_first_then_the_budget() {
    let limits = GateLimits {
        max_open: 10,
        max_per_source: 3,
    };
    // (open, from source, verdict)
    let cases = [
        (0, 0, Ok(())),
        (9, 2, Ok(())),
        (10, 0, Err(RefusalReason::Budget)),
        (11, 2, Err(RefusalReason::Budget)),
        (5, 3, Err(RefusalReason::PerIp)),
        (10, 3, Err(RefusalReason::PerIp)),
    ];
    for (open, from_source, verdict) in cases {
        assert_eq!(
            decide(open, from_source, limits),
            verdict,
            "open {open}, from source {from_source}"
        );
    }
}

#[test]
fn connect_timeout_is_shortened_under_pressure() {
    let (normal, short) = (Duration::from_secs(10), Duration::from_secs(2));
    // (unauthenticated, pressure at, normal, short, expected)
    let cases = [
        (1, 100, normal, short, (normal, false)),
        (99, 100, normal, short, (normal, false)),
        (100, 100, normal, short, (short, true)),
        (5000, 100, normal, short, (short, true)),
        // A "short" timeout that is not shorter changes nothing.
        (5000, 100, short, normal, (short, false)),
    ];
    for (n, at, normal, short, expected) in cases {
        assert_eq!(connect_timeout(n, at, normal, short), expected, "{n}/{at}");
    }
}

#[test]
fn sources_group_ipv6_by_64_and_unmap_ipv4() {
    let s = |a: &str| Source::of(a.parse().unwrap());
    assert_eq!(s("192.0.2.1"), s("192.0.2.1"));
    assert_ne!(s("192.0.2.1"), s("192.0.2.2"));
    assert_eq!(s("::ffff:192.0.2.1"), s("192.0.2.1"));
    assert_eq!(s("2001:db8:1:2::1"), s("2001:db8:1:2:ffff::9"));
    assert_ne!(s("2001:db8:1:2::1"), s("2001:db8:1:3::1"));
    assert_eq!(s("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    assert_eq!(s("192.0.2.1").to_string(), "192.0.2.1");
}

fn peer(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 40_000)
}

#[test]
fn gate_counts_refuses_and_frees() {
    let metrics = Metrics::new();
    let gate = Gate::new(
        Listener::Mqtt,
        GateLimits {
            max_open: 4,
            max_per_source: 2,
        },
        &metrics,
    );
    let mut a1 = gate.try_admit(peer("10.0.0.1")).unwrap();
    let a2 = gate.try_admit(peer("10.0.0.1")).unwrap();
    assert_eq!(a2.unauthenticated_at_admission(), 2);
    assert_eq!(
        gate.try_admit(peer("10.0.0.1")).err(),
        Some(RefusalReason::PerIp)
    );
    // Authenticated sockets leave their source's cap but stay in the budget.
    a1.authenticated();
    assert_eq!(gate.unauthenticated(), 1);
    let a3 = gate.try_admit(peer("10.0.0.1")).unwrap();
    let b1 = gate.try_admit(peer("10.0.0.2")).unwrap();
    assert_eq!(gate.open(), 4);
    assert_eq!(
        gate.try_admit(peer("10.0.0.3")).err(),
        Some(RefusalReason::Budget)
    );
    drop(a1);
    let b2 = gate.try_admit(peer("10.0.0.3")).unwrap();
    drop((a2, a3, b1, b2));
    assert_eq!((gate.open(), gate.unauthenticated()), (0, 0));
    assert!(
        gate.lock().per_source.is_empty(),
        "no entry outlives its sockets"
    );

    let text = metrics.encode();
    for line in [
        r#"fleetgate_connections_refused_total{listener="mqtt",reason="proxy_untrusted"} 0"#,
        r#"fleetgate_connections_refused_total{listener="mqtt",reason="per_ip"} 1"#,
        r#"fleetgate_connections_refused_total{listener="mqtt",reason="budget"} 1"#,
        r#"fleetgate_connections_open{listener="mqtt"} 0"#,
        r#"fleetgate_connection_budget{listener="mqtt"} 4"#,
        "fleetgate_mqtt_unauthenticated_connections 0",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
}

#[test]
fn a_balancers_sockets_take_their_clients_slots_once_attributed() {
    let metrics = Metrics::new();
    let gate = Gate::new(
        Listener::Mqtt,
        GateLimits {
            max_open: 4,
            max_per_source: 2,
        },
        &metrics,
    );
    let balancer = peer("10.0.0.1");
    let client = peer("192.0.2.7");
    // The balancer's sockets pass by the budget alone, whatever its own source holds.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(gate.try_admit_unattributed(balancer).unwrap());
    }
    assert_eq!(gate.unauthenticated_from(balancer.ip()), 0);
    assert_eq!((gate.open(), gate.unauthenticated()), (3, 3));
    // Named by their headers, they count against the client's source.
    held[0].attribute(client).unwrap();
    held[1].attribute(client).unwrap();
    assert_eq!(gate.unauthenticated_from(client.ip()), 2);
    assert_eq!(held[2].attribute(client), Err(RefusalReason::PerIp));
    // Refused, it still holds only its budget place and unauthenticated count, which it
    // gives back when dropped.
    drop(held.pop());
    assert_eq!((gate.open(), gate.unauthenticated()), (2, 2));
    // Attributing twice changes nothing; an authenticated socket leaves its source's cap.
    held[0].attribute(peer("192.0.2.8")).unwrap();
    assert_eq!(gate.unauthenticated_from(peer("192.0.2.8").ip()), 0);
    held[0].authenticated();
    assert_eq!(gate.unauthenticated_from(client.ip()), 1);
    // A socket still unattributed (its header not read yet) and a direct one from the
    // balancer's own address do not disturb each other's counts.
    let lone = gate.try_admit_unattributed(balancer).unwrap();
    assert_eq!(gate.try_admit(balancer).map(drop), Ok(()));
    // The budget still applies at accept: 3 open + 1 = 4.
    let fourth = gate.try_admit(peer("192.0.2.9")).unwrap();
    assert_eq!(
        gate.try_admit_unattributed(balancer).err(),
        Some(RefusalReason::Budget)
    );
    gate.refuse_untrusted(peer("198.51.100.1"));
    drop((held, lone, fourth));
    assert_eq!((gate.open(), gate.unauthenticated()), (0, 0));
    assert!(gate.lock().per_source.is_empty());
    let text = metrics.encode();
    for line in [
        r#"fleetgate_connections_refused_total{listener="mqtt",reason="per_ip"} 1"#,
        r#"fleetgate_connections_refused_total{listener="mqtt",reason="budget"} 1"#,
        r#"fleetgate_connections_refused_total{listener="mqtt",reason="proxy_untrusted"} 1"#,
        "fleetgate_mqtt_unauthenticated_connections 0",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
}
