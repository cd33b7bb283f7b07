//! The seed corpus of the fuzz targets, made with the gateway's own encoders and writers.

use super::{
    publish_bytes, FuzzDevices, HANDSHAKE_MAX_PACKET, MAX_FUZZ_UNPACKED, PACKAGE_KEY, PRODUCT,
    SECRET,
};
use crate::broker::fuzzing::{encode, next_frame, open, Opening, UNCHECKED};
use crate::export::package::{self, read_package, ExportItem, UnpackLimits};
use crate::export::ObjectType;
use bytes::{Bytes, BytesMut};
use fleetgate_topics::sign::{LinkClientId, LinkCredentials, SignMethod};
use rumqttd::protocol::{
    Connect, Disconnect, DisconnectReasonCode, Filter, LastWill, Login, Packet, PingReq, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, QoS,
    RetainForwardRule, Subscribe, Unsubscribe,
};

// ---------------------------------------------------------------------------------------------
// Seed corpus
// ---------------------------------------------------------------------------------------------

/// One seed: `(target, file name, bytes)`.
pub type Seed = (&'static str, String, Vec<u8>);

/// Realistic inputs for every target, made with the gateway's own encoders and writers.
/// Panics if a seed does not reach the path it was made for (e.g. a valid CONNECT refused).
pub fn seed_corpus() -> Vec<Seed> {
    let mut seeds = Vec::new();
    mqtt_seeds(&mut seeds);
    payload_seeds(&mut seeds);
    csv_seeds(&mut seeds);
    package_seeds(&mut seeds);
    seeds
}

fn packet(p: Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(p, &mut out).expect("seed packets encode");
    out.to_vec()
}

fn connect_packet(creds: &LinkCredentials, will: Option<LastWill>, keep_alive: u16) -> Vec<u8> {
    packet(Packet::Connect(
        Connect {
            keep_alive,
            client_id: creds.client_id.clone(),
            clean_session: true,
        },
        None,
        will,
        None,
        Some(Login {
            username: creds.username.clone(),
            password: creds.password.clone(),
        }),
    ))
}

fn mqtt_seeds(seeds: &mut Vec<Seed>) {
    let dev1 = |m: SignMethod, ts: Option<&str>| {
        LinkCredentials::new(PRODUCT, "dev1", SECRET, m, 3, ts.map(str::to_owned))
    };
    let mut handshake = |name: &str, bytes: Vec<u8>| {
        seeds.push(("mqtt_handshake", name.to_owned(), bytes));
    };
    let mut accepted = Vec::new();
    for m in SignMethod::ALL {
        let creds = dev1(m, Some("1700000000000"));
        let bytes = connect_packet(&creds, None, 60);
        accepted.push(bytes.clone());
        handshake(&format!("connect-{m}"), bytes);
    }
    // The vendor SDK's form: `_ss=1`, extra unsigned parameters, no timestamp.
    let sdk = LinkClientId::parse(&format!(
        "{PRODUCT}.dev1|securemode=2,signmethod=hmacsha256,_ss=1,lan=C,_v=sdk-c-4.1.0|"
    ))
    .expect("SDK client id");
    let sdk_creds = LinkCredentials {
        client_id: sdk
            .to_client_id_string()
            .replace(",_ss=1|", ",_ss=1,lan=C,_v=sdk-c-4.1.0|"),
        username: format!("dev1&{PRODUCT}"),
        password: sdk.password(PRODUCT, "dev1", SECRET),
    };
    let sdk_connect = connect_packet(&sdk_creds, None, 300);
    accepted.push(sdk_connect.clone());
    handshake("connect-sdk-ss", sdk_connect);
    let will = |topic: &str| LastWill {
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        message: Bytes::from_static(br#"{"status":"offline"}"#),
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    let with_own_will = connect_packet(
        &dev1(SignMethod::HmacSha1, None),
        Some(will(&format!(
            "/sys/{PRODUCT}/dev1/thing/event/property/post"
        ))),
        30,
    );
    accepted.push(with_own_will.clone());
    handshake("connect-own-will", with_own_will);
    let foreign_will = connect_packet(
        &dev1(SignMethod::HmacMd5, None),
        Some(will(&format!(
            "/sys/{PRODUCT}/dev9/thing/event/property/post"
        ))),
        0,
    );
    accepted.push(foreign_will.clone());
    handshake("connect-foreign-will", foreign_will);
    for bytes in &accepted {
        let mut buf = BytesMut::from(&bytes[..]);
        let frame = next_frame(&mut buf, HANDSHAKE_MAX_PACKET).expect("seed decodes");
        let verdict = open(
            Ok(frame.expect("seed is complete")),
            &FuzzDevices,
            UNCHECKED,
        );
        assert!(matches!(verdict, Opening::Accepted { .. }), "seed refused");
    }
    let disabled = LinkCredentials::new(PRODUCT, "dev2", SECRET, SignMethod::HmacSha256, 3, None);
    handshake("connect-disabled", connect_packet(&disabled, None, 60));
    let unknown = LinkCredentials::new("otherpk", "dev1", SECRET, SignMethod::HmacSha256, 3, None);
    handshake("connect-unknown", connect_packet(&unknown, None, 60));
    let mut wrong = dev1(SignMethod::HmacSha256, None);
    wrong.password = "0".repeat(64);
    handshake("connect-bad-signature", connect_packet(&wrong, None, 60));
    // MQTT 5 CONNECT (level 5, empty properties) and MQTT 3.1 (`MQIsdp`, level 3).
    handshake(
        "connect-mqtt5",
        vec![
            0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00,
            0x01, b'a',
        ],
    );
    handshake(
        "connect-mqtt31",
        vec![
            0x10, 0x0F, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C,
            0x00, 0x01, b'a',
        ],
    );
    handshake(
        "publish-first",
        publish_bytes(1, 7, b"/sys/a1pk/dev1/thing/event/property/post", b"{}"),
    );

    // The codec target: a selector byte (packet size limit), then a session's packets.
    let topic = format!("/sys/{PRODUCT}/dev1/thing/event/property/post");
    let post = br#"{"id":"1","version":"1.0","params":{"Temp":21.5},"method":"thing.event.property.post"}"#;
    let filter = |path: String, qos: QoS| Filter {
        path,
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::Never,
    };
    let subscribe = packet(Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![
                filter(format!("/sys/{PRODUCT}/dev1/#"), QoS::AtMostOnce),
                filter(
                    format!("/ota/device/upgrade/{PRODUCT}/dev1"),
                    QoS::AtLeastOnce,
                ),
            ],
        },
        None,
    ));
    let unsubscribe = packet(Packet::Unsubscribe(
        Unsubscribe {
            pkid: 2,
            filters: vec![format!("/ota/device/upgrade/{PRODUCT}/dev1")],
        },
        None,
    ));
    let session: Vec<Vec<u8>> = vec![
        accepted[0].clone(),
        subscribe,
        publish_bytes(0, 0, topic.as_bytes(), post),
        publish_bytes(1, 10, topic.as_bytes(), post),
        publish_bytes(
            2,
            11,
            format!("/ota/device/progress/{PRODUCT}/dev1").as_bytes(),
            br#"{"id":"2","params":{"step":"42","desc":"downloading"}}"#,
        ),
        packet(Packet::PubRel(
            PubRel {
                pkid: 11,
                reason: PubRelReason::Success,
            },
            None,
        )),
        packet(Packet::PubAck(
            PubAck {
                pkid: 3,
                reason: PubAckReason::Success,
            },
            None,
        )),
        packet(Packet::PubRec(
            PubRec {
                pkid: 4,
                reason: PubRecReason::Success,
            },
            None,
        )),
        packet(Packet::PubComp(
            PubComp {
                pkid: 4,
                reason: PubCompReason::Success,
            },
            None,
        )),
        packet(Packet::PingReq(PingReq)),
        unsubscribe,
        packet(Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        )),
    ];
    for (selector, name) in [(1u8, "session-1k"), (2, "session-256k")] {
        let mut bytes = vec![selector];
        bytes.extend(session.iter().flatten());
        seeds.push(("mqtt_codec", name.to_owned(), bytes));
    }
    let mut big = vec![0u8];
    big.extend(publish_bytes(1, 1, topic.as_bytes(), &[b'x'; 100]));
    seeds.push(("mqtt_codec", "publish-over-64".to_owned(), big));
}

fn payload_seeds(seeds: &mut Vec<Seed>) {
    for spec in fleetgate_topics::catalog().topics() {
        let kind = spec.name.as_str();
        for (i, example) in spec.examples.iter().enumerate() {
            seeds.push((
                "link_payloads",
                format!("{kind}-{i}"),
                example.clone().into(),
            ));
        }
        for (i, example) in spec.invalid_examples.iter().enumerate() {
            let name = format!("{kind}-invalid-{i}");
            seeds.push(("link_payloads", name, example.clone().into()));
        }
    }

    let lines = |creds: &LinkCredentials| {
        format!(
            "{}\n{}\n{}",
            creds.client_id, creds.username, creds.password
        )
        .into_bytes()
    };
    for m in SignMethod::ALL {
        for (dn, ts) in [("dev1", Some("1700000000")), ("dev2", None)] {
            let creds = LinkCredentials::new(PRODUCT, dn, SECRET, m, 2, ts.map(str::to_owned));
            let name = format!("{dn}-{m}");
            seeds.push(("link_credentials", name, lines(&creds)));
        }
    }
    seeds.push((
        "link_credentials",
        "sdk-extra-params".to_owned(),
        format!("{PRODUCT}.dev1|securemode=3,signmethod=hmacsha1,_ss=1,lan=C,ext=1|\ndev1&{PRODUCT}\n00")
            .into_bytes(),
    ));
}

fn csv_seeds(seeds: &mut Vec<Seed>) {
    let with = |selector: u8, body: &[u8]| {
        let mut bytes = vec![selector];
        bytes.extend_from_slice(body);
        bytes
    };
    let bodies: [(&str, u8, &[u8]); 8] = [
        (
            "batch-csv",
            0,
            b"DeviceName,DeviceSecret\r\nsensor-0001,\r\nsensor-0002,9f0c1e2d3c4b5a69\r\n",
        ),
        (
            "batch-csv-bom-blank-rows",
            0,
            b"\xEF\xBB\xBFdevicename , DeviceSecret\r\na,s1\r\nb,\r\n,\r\n\r\nc\n",
        ),
        (
            "batch-csv-bad-rows",
            0,
            b"DeviceName,DeviceSecret\nok1,s\nextra,s,zzz\nbad\xff,s\n\"quoted, name\",x\n",
        ),
        (
            "batch-json",
            1,
            br#"{"devices":[{"device_name":"a","device_secret":"s"},{"device_name":"b","tags":{"site":"north"}}]}"#,
        ),
        ("batch-json-list", 1, br#"[{"device_name":"a"},{"device_name":7}]"#),
        ("ota-device-list", 2, b"sensor-0001\nsensor-0002\n\nsensor-0003\n"),
        ("ota-device-list-csv", 2, b"Model,DeviceName\nx1,sensor-0001\nx2, sensor-0002 \n"),
        ("canary-csv", 3, b"DeviceName,Site\nsensor-0001,north\nsensor-0002,south\n,\n"),
    ];
    for (name, selector, body) in bodies {
        seeds.push(("csv_batch", name.to_owned(), with(selector, body)));
    }
}

fn package_seeds(seeds: &mut Vec<Seed>) {
    let dir = std::env::temp_dir().join(format!("fleetgate-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let firmware = b"\x7fELF firmware image 1.0.1 for the seed corpus";
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(firmware));
    let blob = dir.join(&sha);
    std::fs::write(&blob, firmware).expect("write blob");
    let item = |object_type: ObjectType, id: &str, data: serde_json::Value| ExportItem {
        id: id.to_owned(),
        object_type,
        name: id.to_owned(),
        path: format!("/{id}"),
        data,
        secrets: None,
        blob: None,
    };
    let mut fw = item(
        ObjectType::Firmware,
        "fw-1",
        serde_json::json!({"id":"fw-1","product_key":PRODUCT,"module":"default","version":"1.0.1",
            "sha256":sha,"size":firmware.len(),"sign_method":"SHA256"}),
    );
    fw.blob = Some((sha.clone(), blob));
    let plain = vec![
        fw,
        item(
            ObjectType::OtaJob,
            "job-1",
            serde_json::json!({"job":{"id":"job-1","name":"rollout","firmware_id":"fw-1",
                "target":{"type":"ALL"}}}),
        ),
    ];
    let mut secret = vec![
        item(
            ObjectType::Product,
            PRODUCT,
            serde_json::json!({"product_key":PRODUCT,"name":"Thermometer","description":"",
                "instance_id":"default"}),
        ),
        item(
            ObjectType::Device,
            &format!("{PRODUCT}/dev1"),
            serde_json::json!({"product_key":PRODUCT,"device_name":"dev1","enabled":true,
                "tags":{"site":"north"}}),
        ),
    ];
    secret[0].secrets = Some(serde_json::json!({"product_secret":"p-secret"}));
    secret[1].secrets = Some(serde_json::json!({"device_secret":SECRET}));
    secret.extend(plain.iter().cloned());
    for (name, items, key) in [
        ("export-plain.zip", &plain, None),
        ("export-secrets.zip", &secret, Some((PACKAGE_KEY, 1))),
    ] {
        let dest = dir.join(name);
        package::write_package(
            &dest,
            ("job-1", "seed export", 1_700_000_000_000),
            items,
            key,
        )
        .expect("seed package writes");
        let bytes = std::fs::read(&dest).expect("read package");
        let limits = UnpackLimits {
            entry_bytes: MAX_FUZZ_UNPACKED,
            total_bytes: 4 * MAX_FUZZ_UNPACKED,
        };
        let pkg = read_package(Bytes::from(bytes.clone()), key.map(|(k, _)| k), limits)
            .expect("seed package reads");
        assert_eq!(pkg.objects.len(), items.len());
        seeds.push(("import_package", name.to_owned(), bytes));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
