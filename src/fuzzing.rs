//! Entry points of the fuzz targets in `fuzz/` (docs/SECURITY.md, "Fuzzing"); compiled only
//! with the `fuzzing` feature, never part of the gateway's API.
//!
//! Each function takes the fuzzer's bytes, runs the gateway's own code for one kind of
//! untrusted input (the parsers stay crate-private; only these harnesses are exported) and
//! panics when an invariant breaks; any other outcome, including a refusal, is a pass. The
//! Link payload parsers are public in `fleetgate-topics` and fuzzed from the target directly.
//!
//! [`seed_corpus`] makes the committed seed corpus (`examples/fuzz_seeds.rs`) from the real
//! encoders and writers, so the seeds stay valid as the formats change.

use std::collections::HashMap;
use std::future::Future;

use bytes::{Bytes, BytesMut};
use fleetgate_topics::sign::{parse_username, LinkClientId, LinkCredentials, SignMethod};
use rumqttd::protocol::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, LastWill, Login,
    Packet, PingReq, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel,
    PubRelReason, QoS, RetainForwardRule, Subscribe, Unsubscribe,
};

use crate::api::fuzzing as api;
use crate::broker::fuzzing::{
    authenticate, encode, next_frame, open, own_will, publish_meta, Frame, Opening, Refusal,
    UpPublish, UNCHECKED,
};
use crate::broker::{
    acl, DeviceCredentials, DeviceHooks, DisconnectReason, PublishOutcome, Session, UpMessage,
};
use crate::export::package::{self, read_package, ExportItem, PackageError, UnpackLimits};
use crate::export::ObjectType;

/// The packet size limit of the handshake target: the gateway's default `max_payload_bytes`.
const HANDSHAKE_MAX_PACKET: usize = 256 * 1024;
/// The only product the fuzz devices belong to.
const PRODUCT: &str = "a1pk";
/// `dev1` is enabled, `dev2` disabled; both have this secret.
const SECRET: &str = "s3cr3t";
/// Passphrase of the encrypted seed package.
const PACKAGE_KEY: &str = "fuzz-passphrase";
/// Key derivations above this many PBKDF2 rounds are not run (see [`import_package`]).
const MAX_FUZZ_ITERATIONS: u32 = 64;

/// What one file of a fuzzed package may inflate to (the gateway's default is 256 MiB).
const MAX_FUZZ_UNPACKED: u64 = 1024 * 1024;

/// Two devices of one product: what [`authenticate`] looks up.
struct FuzzDevices;

impl DeviceHooks for FuzzDevices {
    fn credentials(&self, product_key: &str, device_name: &str) -> Option<DeviceCredentials> {
        let enabled = match (product_key, device_name) {
            (PRODUCT, "dev1") => true,
            (PRODUCT, "dev2") => false,
            _ => return None,
        };
        Some(DeviceCredentials {
            device_secret: SECRET.to_owned(),
            enabled,
        })
    }
    fn on_connect(&self, _: &Session) {}
    fn on_disconnect(&self, _: &Session, _: DisconnectReason) {}
    fn on_publish(
        &self,
        _: &Session,
        _: UpMessage<'_>,
    ) -> impl Future<Output = PublishOutcome> + Send {
        std::future::ready(PublishOutcome::Processed)
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT
// ---------------------------------------------------------------------------------------------

/// The codec over a stream of packets: the first byte picks the packet size limit, the rest is
/// what a client sends after its CONNECT.
///
/// Invariants: every decoded PUBLISH is well-formed, [`publish_meta`] reads the same QoS and
/// packet id from its bytes, and it decodes again from its canonical encoding; every other
/// packet re-encodes and decodes to itself; feeding the stream in two pieces yields the same
/// packets as feeding it whole (partial frames wait).
pub fn mqtt_codec(data: &[u8]) {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let max = [64, 1024, HANDSHAKE_MAX_PACKET][usize::from(selector % 3)];
    let whole = decode_stream(stream, max, &[stream.len()]);
    if stream.len() > 1 {
        let cut = usize::from(selector) * 31 % stream.len();
        let pieces = decode_stream(stream, max, &[cut, stream.len()]);
        assert!(whole == pieces, "split at {cut}: {whole:?} vs {pieces:?}");
    }
}

/// What a stream decodes to: its frames, then how it ended.
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<DecodedFrame>,
    /// `true`: a protocol error closed the connection; `false`: waiting for more bytes.
    failed: bool,
}

#[derive(Debug, PartialEq)]
enum DecodedFrame {
    Publish(UpPublish),
    Other(Box<Packet>),
}

/// Decodes `stream` as the connection does, appending it to the read buffer up to each of
/// `ends` in turn.
fn decode_stream(stream: &[u8], max: usize, ends: &[usize]) -> Decoded {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    // Offset in `stream` of the first byte still in `buf`.
    let mut consumed = 0;
    for &end in ends {
        buf.extend_from_slice(&stream[fed..end]);
        fed = end;
        loop {
            let before = buf.len();
            match next_frame(&mut buf, max) {
                Ok(None) => {
                    assert_eq!(buf.len(), before, "an incomplete frame consumed bytes");
                    break;
                }
                Err(_) => {
                    return Decoded {
                        frames,
                        failed: true,
                    }
                }
                Ok(Some(frame)) => {
                    let used = before - buf.len();
                    assert!(used > 0, "a frame from no bytes");
                    let raw = &stream[consumed..consumed + used];
                    consumed += used;
                    frames.push(check_frame(frame, raw, max));
                }
            }
        }
    }
    Decoded {
        frames,
        failed: false,
    }
}

fn check_frame(frame: Frame, raw: &[u8], max: usize) -> DecodedFrame {
    match frame {
        Frame::Publish(p) => {
            assert!(p.qos <= 2, "QoS {}", p.qos);
            assert_eq!(
                p.qos == 0,
                p.pkid == 0,
                "QoS {} with packet id {}",
                p.qos,
                p.pkid
            );
            assert_eq!(
                publish_meta(raw),
                Some((p.qos, p.pkid)),
                "publish_meta disagrees"
            );
            let canonical = publish_bytes(p.qos, p.pkid, &p.topic, &p.payload);
            assert_eq!(publish_meta(&canonical), Some((p.qos, p.pkid)));
            let mut again = BytesMut::from(&canonical[..]);
            match next_frame(&mut again, max) {
                Ok(Some(Frame::Publish(q))) => assert_eq!(q, p),
                other => panic!("re-encoded PUBLISH decodes to {other:?}"),
            }
            assert!(again.is_empty());
            DecodedFrame::Publish(p)
        }
        Frame::Other(packet) => {
            let packet = *packet;
            let mut out = BytesMut::new();
            encode(packet.clone(), &mut out)
                .unwrap_or_else(|e| panic!("{packet:?} does not re-encode: {e:?}"));
            match next_frame(&mut out, usize::MAX) {
                Ok(Some(Frame::Other(again))) => assert_eq!(*again, packet),
                other => panic!("re-encoded {packet:?} decodes to {other:?}"),
            }
            assert!(out.is_empty());
            DecodedFrame::Other(Box::new(packet))
        }
    }
}

/// A PUBLISH as a client encodes it (minimal remaining length, no DUP/RETAIN).
fn publish_bytes(qos: u8, pkid: u16, topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    let topic_len = u16::try_from(topic.len()).expect("a decoded topic fits its u16 length");
    body.extend_from_slice(&topic_len.to_be_bytes());
    body.extend_from_slice(topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let mut out = vec![0x30 | (qos << 1)];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

/// The first bytes of a connection, through the handshake's verdict ([`open`]).
///
/// Invariants: only a CONNECT is accepted, and only for the enabled device whose secret signed
/// it; its router client id is escaped; a refusal's CONNACK encodes; a kept will is on one of
/// the device's own topics.
pub fn mqtt_handshake(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let first = match next_frame(&mut buf, HANDSHAKE_MAX_PACKET) {
        Ok(None) => return, // the handshake waits for more bytes
        Ok(Some(frame)) => Ok(frame),
        Err(e) => Err(e),
    };
    let login = match &first {
        Ok(Frame::Other(p)) => match &**p {
            Packet::Connect(_, _, _, _, login) => Some(login.clone()),
            _ => None,
        },
        _ => None,
    };
    match open(first, &FuzzDevices, UNCHECKED) {
        Opening::Accepted {
            connect,
            will,
            auth,
        } => {
            let login = login
                .expect("only a CONNECT is accepted")
                .expect("no CONNECT is accepted without a login");
            let (dn, pk) = parse_username(&login.username).expect("accepted username parses");
            assert_eq!(
                (pk, dn),
                (PRODUCT, "dev1"),
                "accepted a device that is not enabled"
            );
            assert_eq!(auth.device.product_key, pk);
            assert_eq!(auth.device.device_name, dn);
            let id = LinkClientId::parse(&connect.client_id).expect("accepted client id parses");
            assert!(id.verify(pk, dn, SECRET, &login.password));
            assert_eq!(auth.auto_subscribe, id.auto_subscribe);
            let router_id = &auth.router_client_id;
            assert_eq!(router_id.matches('&').count(), 1, "{router_id}");
            assert!(!router_id.contains(['+', '$', '#', '/']), "{router_id}");
            if let Some((topic, _)) = will.and_then(|w| own_will(&auth.device, w)) {
                assert!(acl::topic_allowed(pk, dn, &topic), "will on {topic}");
            }
            let _keep_alive_ms = u64::from(connect.keep_alive) * 1500;
            connack_bytes(ConnectReturnCode::Success);
        }
        Opening::Refused(refusal) => {
            assert_ne!(
                refusal,
                Refusal::Limit,
                "no limit applies to a first packet"
            );
            let bytes = connack_bytes(refusal.code());
            assert_eq!(bytes[..3], [0x20, 0x02, 0x00], "{bytes:?}");
            assert_ne!(bytes[3], 0, "a refusal answered with success");
        }
        Opening::Dropped(reason) => assert_eq!(reason, "protocol"),
    }
}

fn connack_bytes(code: ConnectReturnCode) -> BytesMut {
    let mut out = BytesMut::new();
    let ack = ConnAck {
        session_present: false,
        code,
    };
    encode(Packet::ConnAck(ack, None), &mut out).expect("a CONNACK encodes");
    out
}

/// Link CONNECT credentials: `client id \n username \n password`, parsed by the Link parsers and
/// checked by the broker's [`authenticate`].
///
/// Invariants: a parsed client id re-serialises to one that parses to the same value; a parsed
/// username is exactly `{dn}&{pk}`; only a known, enabled device with a verifying password is
/// accepted; and the password signed for any parsed client id is accepted (signing and
/// verifying agree).
pub fn link_credentials(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let client_id = parts.next().unwrap_or_default();
    let username = parts.next();
    let password = parts.next().unwrap_or_default();

    let parsed = LinkClientId::parse(client_id).ok();
    if let Some(id) = &parsed {
        assert!(!id.client_id.contains('|'));
        assert!(matches!(id.secure_mode, 2 | 3));
        let again = LinkClientId::parse(&id.to_client_id_string())
            .expect("a re-serialised client id parses");
        assert_eq!(&again, id);
    }
    let user = username.and_then(|u| parse_username(u).ok());
    if let (Some(u), Some((dn, pk))) = (username, user) {
        assert_eq!(format!("{dn}&{pk}"), u);
        assert!(!dn.is_empty() && !pk.is_empty() && !pk.contains('&'));
    }

    let login = username.map(|u| Login {
        username: u.to_owned(),
        password: password.to_owned(),
    });
    match authenticate(client_id, login.as_ref(), &FuzzDevices, UNCHECKED) {
        Ok(auth) => {
            let id = parsed.as_ref().expect("accepted client id");
            let (dn, pk) = user.expect("accepted username");
            assert_eq!((pk, dn), (PRODUCT, "dev1"));
            assert!(id.verify(pk, dn, SECRET, password));
            assert_eq!(auth.device.device_name, dn);
        }
        Err(refusal) => assert!(refusal != Refusal::Protocol && refusal != Refusal::Limit),
    }

    // Sign for the parsed client id and device: the broker must agree.
    let (Some(id), Some(u), Some((dn, pk))) = (&parsed, username, user) else {
        return;
    };
    let Some(creds) = FuzzDevices.credentials(pk, dn) else {
        return;
    };
    let login = Login {
        username: u.to_owned(),
        password: id.password(pk, dn, &creds.device_secret),
    };
    let verdict = authenticate(client_id, Some(&login), &FuzzDevices, UNCHECKED);
    if creds.enabled {
        assert!(
            verdict.is_ok(),
            "a correctly signed CONNECT is refused: {verdict:?}"
        );
    } else {
        assert_eq!(verdict.err(), Some(Refusal::DisabledDevice));
    }
}

// ---------------------------------------------------------------------------------------------
// CSV / JSON batch bodies
// ---------------------------------------------------------------------------------------------

/// The device-list readers of the API: the first byte picks batch create CSV (0) or JSON (1),
/// the OTA job's uploaded device list (2) or the migration canary's CSV (3).
///
/// Invariants: a body is refused with an error or yields between 1 and the limit's rows, and
/// CSV fields come out trimmed.
pub fn csv_batch(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 | 1 => {
            let parsed = if selector % 4 == 0 {
                api::batch_csv_rows(body)
            } else {
                api::batch_json_rows(body)
            };
            let Ok(rows) = parsed else { return };
            assert!((1..=api::MAX_BATCH_ROWS).contains(&rows.len()));
            for device in rows.iter().flatten().filter(|_| selector % 4 == 0) {
                assert_eq!(device.device_name.trim_ascii(), device.device_name);
                if let Some(secret) = &device.device_secret {
                    assert!(!secret.is_empty() && secret.trim_ascii() == secret);
                }
            }
        }
        2 => {
            let Ok(text) = std::str::from_utf8(body) else {
                return;
            };
            let Ok(names) = api::ota_device_list(text) else {
                return;
            };
            assert!((1..=api::MAX_DEVICE_NAMES).contains(&names.len()));
            assert!(names.iter().all(|n| !n.is_empty() && n.trim() == n));
        }
        _ => {
            let Ok(names) = api::canary_csv_names(body) else {
                return;
            };
            assert!((1..=api::MAX_PICKED).contains(&names.len()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Import package
// ---------------------------------------------------------------------------------------------

/// An uploaded import package through [`read_package`].
///
/// The package is read without a passphrase first; one that only lacks the passphrase (every
/// file and checksum verified) is read again with the seed corpus's passphrase when its key
/// derivation is cheap: PBKDF2 rounds are bounded by `read_package` itself (10 million, an
/// operator's upload) and are not what this target is after.
///
/// Invariants: a verified package's objects, files and blobs are consistent with its manifest.
pub fn import_package(data: &[u8]) {
    let limits = UnpackLimits {
        entry_bytes: MAX_FUZZ_UNPACKED,
        total_bytes: 4 * MAX_FUZZ_UNPACKED,
    };
    let bytes = Bytes::copy_from_slice(data);
    let verified = match read_package(bytes.clone(), None, limits) {
        Err(PackageError::MissingKey) => {
            let iterations = manifest_iterations(data).expect("a package verified this far");
            if iterations > MAX_FUZZ_ITERATIONS {
                return;
            }
            read_package(bytes, Some(PACKAGE_KEY), limits)
        }
        other => other,
    };
    let Ok(pkg) = verified else { return };
    let listed: HashMap<&str, &package::ManifestFile> = pkg
        .manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    assert_eq!(
        listed.len(),
        pkg.manifest.files.len(),
        "a file listed twice"
    );
    assert_eq!(pkg.objects.len(), pkg.manifest.objects.len());
    for o in &pkg.objects {
        assert!(listed.contains_key(o.meta.file.as_str()), "{}", o.meta.file);
        assert_eq!(o.secrets.is_some(), o.meta.secrets_nonce.is_some());
        if o.secrets.is_some() {
            assert!(pkg.manifest.encryption.is_some());
        }
        if let Some(blob) = &o.meta.blob {
            let source = pkg
                .blob(blob)
                .unwrap_or_else(|| panic!("{blob} is not in the package"));
            let size = source.size();
            let mut streamed = 0u64;
            // Verified on reading: inflating it again yields its listed size and SHA-256.
            source
                .stream(|chunk| {
                    streamed += chunk.len() as u64;
                    true
                })
                .unwrap_or_else(|e| panic!("{blob}: {e}"));
            assert_eq!(streamed, size);
        }
    }
}

/// The PBKDF2 rounds the package's manifest asks for (0 without encryption).
fn manifest_iterations(data: &[u8]) -> Option<u32> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(data)).ok()?;
    let mut manifest = Vec::new();
    std::io::Read::read_to_end(&mut zip.by_name(package::MANIFEST).ok()?, &mut manifest).ok()?;
    let manifest: package::Manifest = serde_json::from_slice(&manifest).ok()?;
    Some(manifest.encryption.map_or(0, |e| e.iterations))
}

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
