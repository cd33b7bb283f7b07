//! MQTT 3.1.1 framing on top of rumqttd's `V4` codec.
//!
//! rumqttd's `Publish` keeps its QoS and packet id crate-private, and the gateway needs both, so
//! PUBLISH packets are decoded here (from the frame rumqttd's `check` delimits) and every other
//! packet by `V4::read_mut`. For the same reason the QoS and packet id of a PUBLISH that rumqttd
//! forwards to a device are read back from its encoded bytes ([`publish_meta`]).
//!
//! Frames are split off the read buffer and frozen, so a parsed packet shares (and keeps alive)
//! the allocation it was read into; the buffer itself only ever grows by `reserve`, which never
//! invalidates bytes already handed out.

use bytes::{Buf, Bytes, BytesMut};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::{self, Packet, Protocol};

/// An upstream PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpPublish {
    pub qos: u8,
    pub pkid: u16,
    pub topic: Bytes,
    pub payload: Bytes,
}

/// One packet from a client.
#[derive(Debug)]
pub(crate) enum Frame {
    Publish(UpPublish),
    /// Boxed: rumqttd's `Packet` is ~400 bytes, most packets are small PUBLISHes.
    Other(Box<Packet>),
}

/// Takes the next complete packet out of `buf`. `Ok(None)`: more bytes needed (and reserved).
/// Any error means the peer sent something that is not MQTT 3.1.1 within `max_size`.
pub(crate) fn next_frame(
    buf: &mut BytesMut,
    max_size: usize,
) -> Result<Option<Frame>, protocol::Error> {
    let header = match v4::check(buf.iter(), max_size) {
        Ok(header) => header,
        Err(protocol::Error::InsufficientBytes(n)) => {
            buf.reserve(n);
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if header.byte1 >> 4 == 3 {
        let frame = buf.split_to(header.frame_length()).freeze();
        return decode_publish(header.byte1, header.fixed_header_len, frame)
            .map(|p| Some(Frame::Publish(p)));
    }
    V4.read_mut(buf, max_size)
        .map(|p| Some(Frame::Other(Box::new(p))))
}

fn decode_publish(
    byte1: u8,
    header_len: usize,
    mut frame: Bytes,
) -> Result<UpPublish, protocol::Error> {
    let qos = (byte1 >> 1) & 0b11;
    if qos > 2 {
        return Err(protocol::Error::InvalidQoS(qos));
    }
    frame.advance(header_len);
    if frame.len() < 2 {
        return Err(protocol::Error::MalformedPacket);
    }
    let topic_len = frame.get_u16() as usize;
    if frame.len() < topic_len {
        return Err(protocol::Error::BoundaryCrossed(topic_len));
    }
    let topic = frame.split_to(topic_len);
    let pkid = if qos > 0 {
        if frame.len() < 2 {
            return Err(protocol::Error::MalformedPacket);
        }
        match frame.get_u16() {
            0 => return Err(protocol::Error::PacketIdZero),
            id => id,
        }
    } else {
        0
    };
    Ok(UpPublish {
        qos,
        pkid,
        topic,
        payload: frame,
    })
}

/// Encodes `packet` at the end of `out`. Packets with MQTT 5 properties are written without them
/// (rumqttd's V4 writer panics on properties; they cannot occur on our links, this is a guard).
pub(crate) fn encode(packet: Packet, out: &mut BytesMut) -> Result<(), protocol::Error> {
    let packet = match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        Packet::Subscribe(p, _) => Packet::Subscribe(p, None),
        Packet::Unsubscribe(p, _) => Packet::Unsubscribe(p, None),
        Packet::Connect(c, _, will, _, login) => Packet::Connect(c, None, will, None, login),
        other @ (Packet::ConnAck(..) | Packet::PingReq(_) | Packet::PingResp(_)) => other,
    };
    V4.write(packet, out).map(|_| ())
}

/// `(qos, pkid)` of an encoded PUBLISH (`bytes` starts at its first byte).
pub(crate) fn publish_meta(bytes: &[u8]) -> Option<(u8, u16)> {
    let byte1 = *bytes.first()?;
    if byte1 >> 4 != 3 {
        return None;
    }
    let qos = (byte1 >> 1) & 0b11;
    if qos == 0 {
        return Some((0, 0));
    }
    // Remaining length: 1 to 4 bytes with a continuation bit.
    let mut i = 1;
    while *bytes.get(i)? & 0x80 != 0 {
        i += 1;
    }
    let topic_len_at = i + 1;
    let topic_len =
        u16::from_be_bytes([*bytes.get(topic_len_at)?, *bytes.get(topic_len_at + 1)?]) as usize;
    let pkid_at = topic_len_at + 2 + topic_len;
    let pkid = u16::from_be_bytes([*bytes.get(pkid_at)?, *bytes.get(pkid_at + 1)?]);
    Some((qos, pkid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_bytes(qos: u8, pkid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        let mut out = vec![0x30 | (qos << 1)];
        let mut len = body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            out.push(b);
            if len == 0 {
                break;
            }
        }
        out.extend(body);
        out
    }

    #[test]
    fn decodes_publish_and_reads_meta_back() {
        let payload = vec![7u8; 300];
        for qos in 0..=2u8 {
            let pkid = if qos == 0 { 0 } else { 4242 };
            let bytes = publish_bytes(qos, pkid, "/a/b", &payload);
            assert_eq!(publish_meta(&bytes), Some((qos, pkid)));
            let mut buf = BytesMut::from(&bytes[..]);
            let Some(Frame::Publish(p)) = next_frame(&mut buf, 1024).unwrap() else {
                panic!("not a publish");
            };
            assert_eq!(
                (p.qos, p.pkid, &p.topic[..], p.payload.len()),
                (qos, pkid, &b"/a/b"[..], 300)
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let bytes = publish_bytes(1, 1, "/t", b"hello");
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(
                next_frame(&mut buf, 1024).unwrap().is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn rejects_bad_frames() {
        // QoS 3.
        let mut buf = BytesMut::from(&[0x36u8, 0x04, 0x00, 0x01, b'a', 0x00][..]);
        assert!(next_frame(&mut buf, 1024).is_err());
        // Topic length past the frame.
        let mut buf = BytesMut::from(&[0x30u8, 0x03, 0x00, 0x09, b'a'][..]);
        assert!(next_frame(&mut buf, 1024).is_err());
        // QoS 1 with packet id 0.
        let mut buf = BytesMut::from(&publish_bytes(1, 0, "/t", b"x")[..]);
        assert!(next_frame(&mut buf, 1024).is_err());
        // Too large.
        let mut buf = BytesMut::from(&publish_bytes(0, 0, "/t", &[0u8; 2000])[..]);
        assert!(next_frame(&mut buf, 1024).is_err());
        // Garbage packet types.
        let mut buf = BytesMut::from(&[0x00u8, 0x00][..]);
        assert!(next_frame(&mut buf, 1024).is_err());
        let mut buf = BytesMut::from(&[0xF0u8, 0x00][..]);
        assert!(next_frame(&mut buf, 1024).is_err());
        // Malformed remaining length.
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(next_frame(&mut buf, usize::MAX).is_err());
    }

    #[test]
    fn rejects_mqtt5_connect() {
        // CONNECT, protocol "MQTT", level 5, flags 0x02, keep-alive 60, properties len 0, id "a".
        let body = [
            0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00, 0x01, b'a',
        ];
        let mut bytes = vec![0x10, body.len() as u8];
        bytes.extend_from_slice(&body);
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(
            next_frame(&mut buf, 1024),
            Err(protocol::Error::InvalidProtocolLevel(5))
        ));
    }
}
