//! Unit tests of the connection: read buffer sizing, PROXY-header rewind, first-packet
//! verdicts, will ownership, SUBACK merging and downstream ack order.

use super::handshake::{open, own_will, Opening};
use super::read_loop::{ack_downstream, merge_suback};
use super::*;
use crate::broker::auth::{Refusal, UNCHECKED};
use crate::broker::codec::UpPublish;
use crate::broker::{PublishOutcome, UpMessage};
use futures_util::FutureExt;
use rumqttd::protocol::{Connect, LastWill, SubscribeReasonCode};

/// A connection as `serve` sets one up, on `io`.
fn test_conn<S>(io: S) -> Conn<S> {
    Conn {
        io,
        rbuf: BytesMut::with_capacity(READ_BUFFER),
        wbuf: BytesMut::new(),
        max_packet: 1 << 20,
        read_room: READ_BUFFER,
    }
}

#[tokio::test]
async fn reads_grow_with_a_flood_and_shrink_back() {
    let (mut device, io) = tokio::io::duplex(64 * 1024);
    let mut conn = test_conn(io);
    // A 40 KB flood: each read that fills its room doubles the next one, up to READ_MAX.
    device.write_all(&[0u8; 40 * 1024]).await.unwrap();
    let mut reads = Vec::new();
    while conn.rbuf.len() < 40 * 1024 {
        reads.push(conn.fill().await.unwrap());
    }
    assert_eq!(reads[..5], [1024, 2048, 4096, 8192, 16384]);
    assert_eq!(conn.read_room, READ_MAX);
    // A payload taken out of the buffer keeps its part alive (as a PUBLISH's does): the
    // next read still gets the room it asks for.
    let _payload = conn.rbuf.split().freeze();
    // Small reads give the room back, down to the initial size, never below.
    for _ in 0..8 {
        device.write_all(&[0u8; 100]).await.unwrap();
        assert_eq!(conn.fill().await.unwrap(), 100);
        assert!(conn.rbuf.capacity() - conn.rbuf.len() >= READ_BUFFER - 100);
    }
    assert_eq!(conn.read_room, READ_BUFFER);
}

#[tokio::test]
async fn an_idle_connection_holds_no_read_buffer() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut device = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (io, _) = listener.accept().await.unwrap();
    let mut conn = test_conn(Rewind::plain(io));
    device.write_all(b"0123").await.unwrap();
    assert_eq!(conn.fill().await.unwrap(), 4);
    // Consumed: with nothing more on the socket, the read waits without a buffer.
    conn.rbuf.clear();
    assert!(conn.fill().now_or_never().is_none());
    assert_eq!(conn.rbuf.capacity(), 0);
    // Data arrives: a buffer of the usual room is offered again.
    device.write_all(b"4567").await.unwrap();
    assert_eq!(conn.fill().await.unwrap(), 4);
    assert_eq!(&conn.rbuf[..], b"4567");
    assert!(conn.rbuf.capacity() >= READ_BUFFER);
    // A partial packet pending: the next read appends to it, whatever the socket says.
    conn.rbuf.truncate(2);
    assert!(conn.fill().now_or_never().is_none());
    assert_eq!(&conn.rbuf[..], b"45");
}

#[tokio::test]
async fn bytes_read_past_a_proxy_header_come_first_without_waiting() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut device = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (io, _) = listener.accept().await.unwrap();
    // The socket has nothing to read: the read-ahead is served at once, then the socket.
    let mut conn = test_conn(Rewind::new(io, Bytes::from_static(b"01")));
    assert_eq!(conn.fill().now_or_never().unwrap().unwrap(), 2);
    assert_eq!(&conn.rbuf[..], b"01");
    assert!(!conn.io.has_buffered());
    conn.rbuf.clear();
    assert!(conn.fill().now_or_never().is_none());
    device.write_all(b"23").await.unwrap();
    assert_eq!(conn.fill().await.unwrap(), 2);
    assert_eq!(&conn.rbuf[..], b"23");
}

struct OneDevice;

impl DeviceHooks for OneDevice {
    fn credentials(&self, pk: &str, dn: &str) -> Option<super::super::DeviceCredentials> {
        (pk == "pk1" && dn == "dev1").then(|| super::super::DeviceCredentials {
            device_secret: "s3cr3t".into(),
            enabled: true,
        })
    }
    fn on_connect(&self, _: &Session) {}
    fn on_disconnect(&self, _: &Session, _: DisconnectReason) {}
    async fn on_publish(&self, _: &Session, _: UpMessage<'_>) -> PublishOutcome {
        PublishOutcome::Processed
    }
}

#[test]
fn first_packet_verdicts() {
    use fleetgate_topics::sign::{LinkCredentials, SignMethod};
    let creds = LinkCredentials::new("pk1", "dev1", "s3cr3t", SignMethod::HmacSha256, 3, None);
    let connect = |password: &str| {
        Ok(Frame::Other(Box::new(Packet::Connect(
            Connect {
                keep_alive: 60,
                client_id: creds.client_id.clone(),
                clean_session: true,
            },
            None,
            None,
            None,
            Some(protocol::Login {
                username: creds.username.clone(),
                password: password.to_owned(),
            }),
        ))))
    };
    match open(connect(&creds.password), &OneDevice, UNCHECKED) {
        Opening::Accepted { auth, .. } => assert_eq!(auth.router_client_id, "pk1&dev1"),
        _ => panic!("a signed CONNECT is refused"),
    }
    assert!(matches!(
        open(connect("00"), &OneDevice, UNCHECKED),
        Opening::Refused(Refusal::BadSignature)
    ));
    assert!(matches!(
        open(
            Err(protocol::Error::InvalidProtocolLevel(5)),
            &OneDevice,
            UNCHECKED
        ),
        Opening::Refused(Refusal::Protocol)
    ));
    assert!(matches!(
        open(Err(protocol::Error::MalformedPacket), &OneDevice, UNCHECKED),
        Opening::Dropped("protocol")
    ));
    let ping = Ok(Frame::Other(Box::new(Packet::PingReq(protocol::PingReq))));
    assert!(matches!(
        open(ping, &OneDevice, UNCHECKED),
        Opening::Dropped("protocol")
    ));
    let publish = Ok(Frame::Publish(UpPublish {
        qos: 0,
        pkid: 0,
        topic: Bytes::from_static(b"/sys/pk1/dev1/thing/event/property/post"),
        payload: Bytes::new(),
    }));
    assert!(matches!(
        open(publish, &OneDevice, UNCHECKED),
        Opening::Dropped("protocol")
    ));
}

#[test]
fn a_will_is_kept_only_on_the_devices_own_topics() {
    let device = DeviceKey {
        product_key: "pk1".into(),
        device_name: "dev1".into(),
    };
    let will = |topic: &'static str| LastWill {
        topic: Bytes::from_static(topic.as_bytes()),
        message: Bytes::from_static(b"bye"),
        qos: QoS::AtMostOnce,
        retain: false,
    };
    let own = "/sys/pk1/dev1/thing/event/property/post";
    assert_eq!(
        own_will(&device, will(own)),
        Some((own.to_owned(), Bytes::from_static(b"bye")))
    );
    assert_eq!(
        own_will(&device, will("/sys/pk1/dev2/thing/event/property/post")),
        None
    );
    assert_eq!(own_will(&device, will("/sys/pk1/dev1/#")), None);
}

#[test]
fn suback_codes_keep_their_places() {
    let merged = merge_suback(
        &[true, false, true, false],
        vec![SubscribeReasonCode::QoS1, SubscribeReasonCode::QoS0],
    );
    assert_eq!(
        merged,
        vec![
            SubscribeReasonCode::QoS1,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::QoS0,
            SubscribeReasonCode::Failure
        ]
    );
}

#[test]
fn downstream_acks_in_order_only() {
    let mut awaiting: VecDeque<(u16, u8)> = [(1, 1), (2, 1), (3, 2)].into_iter().collect();
    let mut forwarded = 0;
    // Not awaited: a duplicate, ignored.
    assert!(ack_downstream(&mut awaiting, 9, 1, || forwarded += 1).is_ok());
    assert!(ack_downstream(&mut awaiting, 1, 1, || forwarded += 1).is_ok());
    assert_eq!(forwarded, 1);
    // Out of order: ends the connection.
    assert!(ack_downstream(&mut awaiting, 3, 2, || forwarded += 1).is_err());
    // Wrong kind (PUBREC for a QoS 1 message).
    assert!(ack_downstream(&mut awaiting, 2, 2, || forwarded += 1).is_err());
    assert!(ack_downstream(&mut awaiting, 2, 1, || forwarded += 1).is_ok());
    assert_eq!(forwarded, 2);
}
