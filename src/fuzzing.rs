//! Entry points of the fuzz targets in `fuzz/` (docs/SECURITY.md, "Fuzzing"); compiled only
//! with the `fuzzing` feature, never part of the gateway's API.
//!
//! Each function takes the fuzzer's bytes, runs the gateway's own code for one kind of
//! untrusted input (the parsers stay crate-private; only these harnesses are exported) and
//! panics when an invariant breaks; any other outcome, including a refusal, is a pass. The
//! Link payload parsers are public in `fleetgate-topics` and fuzzed from the target directly.
//!
//! [`seed_corpus`] makes the committed seed corpus (`examples/fuzz_seeds.rs`) from the real
//! encoders and writers (`fuzzing/seeds.rs`), so the seeds stay valid as the formats change.

mod seeds;

pub use seeds::{seed_corpus, Seed};

use std::collections::HashMap;
use std::future::Future;

use bytes::{Bytes, BytesMut};
use fleetgate_topics::sign::{parse_username, LinkClientId};
use rumqttd::protocol::{ConnAck, ConnectReturnCode, Login, Packet};

use crate::api::fuzzing as api;
use crate::broker::fuzzing::{
    authenticate, encode, next_frame, open, own_will, publish_meta, Frame, Opening, Refusal,
    UpPublish, UNCHECKED,
};
use crate::broker::{
    acl, DeviceCredentials, DeviceHooks, DisconnectReason, PublishOutcome, Session, UpMessage,
};
use crate::export::package::{self, read_package, PackageError, UnpackLimits};

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
