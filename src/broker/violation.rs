//! Protocol violations that close a connection without an answer, as MQTT 3.1.1 requires, and
//! the checks that find them in topic names and filters.
//!
//! The spec's rules enforced here: topic names and filters are at least one character long
//! (4.7.3-1) and never contain U+0000 (4.7.3-2, 1.5.3-2); they are well-formed UTF-8 (1.5.3-1);
//! a SUBSCRIBE or UNSUBSCRIBE carries at least one filter (3.8.3-3, 3.10.3-2). Acknowledging such
//! a packet (as the ACL path would: a PUBACK for a dropped PUBLISH, SUBACK 0x80, an UNSUBACK)
//! tells a broken or probing client that it may go on. Each violation is logged and counted
//! (`fleetgate_mqtt_protocol_violations_total{reason}`) by [`Violation::emit`], in one place.

use crate::metrics::Metrics;

/// Why a connection was closed for breaking the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A zero-length topic name (PUBLISH) or topic filter (SUBSCRIBE, UNSUBSCRIBE).
    EmptyTopic,
    /// U+0000 in a topic name or filter.
    NulInTopic,
    /// A topic name that is not UTF-8.
    TopicNotUtf8,
    /// A SUBSCRIBE without filters.
    EmptySubscribe,
    /// An UNSUBSCRIBE without filters.
    EmptyUnsubscribe,
    /// A packet that does not parse as MQTT 3.1.1 (bad framing, QoS 3, packet id 0, …).
    Malformed,
}

impl Violation {
    /// The `reason` label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Violation::EmptyTopic => "empty_topic",
            Violation::NulInTopic => "nul_in_topic",
            Violation::TopicNotUtf8 => "topic_not_utf8",
            Violation::EmptySubscribe => "empty_subscribe",
            Violation::EmptyUnsubscribe => "empty_unsubscribe",
            Violation::Malformed => "malformed",
        }
    }

    /// Logs and counts the violation; the caller then closes the connection.
    pub(crate) fn emit(self, metrics: &Metrics) {
        metrics
            .protocol_violations
            .get_or_create(&[("reason", self.reason())])
            .inc();
        tracing::debug!(
            reason = self.reason(),
            "protocol violation, connection closed"
        );
    }
}

/// A PUBLISH's topic name as text, or the violation it is.
pub(crate) fn topic_name(raw: &[u8]) -> Result<&str, Violation> {
    let topic = std::str::from_utf8(raw).map_err(|_| Violation::TopicNotUtf8)?;
    topic_text(topic)?;
    Ok(topic)
}

/// Checks a topic filter of a SUBSCRIBE or UNSUBSCRIBE (rumqttd's parser already refused one
/// that is not UTF-8).
pub(crate) fn topic_filter(filter: &str) -> Result<(), Violation> {
    topic_text(filter)
}

fn topic_text(text: &str) -> Result<(), Violation> {
    if text.is_empty() {
        Err(Violation::EmptyTopic)
    } else if text.contains('\0') {
        Err(Violation::NulInTopic)
    } else {
        Ok(())
    }
}

/// The violation a packet that failed to parse is.
pub(crate) fn from_parse_error(error: &rumqttd::protocol::Error) -> Violation {
    match error {
        rumqttd::protocol::Error::EmptySubscription => Violation::EmptySubscribe,
        rumqttd::protocol::Error::TopicNotUtf8 => Violation::TopicNotUtf8,
        _ => Violation::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_and_filters() {
        let cases: [(&[u8], Result<(), Violation>); 7] = [
            (b"/sys/pk/dn/x", Ok(())),
            (b"a", Ok(())),
            (b"", Err(Violation::EmptyTopic)),
            (b"/sys/pk/dn/\0", Err(Violation::NulInTopic)),
            (b"\0", Err(Violation::NulInTopic)),
            (b"/sys/\xff", Err(Violation::TopicNotUtf8)),
            // Not this module's business: wildcards in a name are the ACL's (dropped, acked).
            (b"/sys/+/dn", Ok(())),
        ];
        for (raw, expected) in cases {
            assert_eq!(topic_name(raw).map(drop), expected, "{raw:?}");
            if let Ok(text) = std::str::from_utf8(raw) {
                assert_eq!(topic_filter(text), expected, "{raw:?}");
            }
        }
    }

    #[test]
    fn parse_errors_have_their_reasons() {
        use rumqttd::protocol::Error;
        assert_eq!(
            from_parse_error(&Error::EmptySubscription),
            Violation::EmptySubscribe
        );
        assert_eq!(
            from_parse_error(&Error::TopicNotUtf8),
            Violation::TopicNotUtf8
        );
        assert_eq!(from_parse_error(&Error::PacketIdZero), Violation::Malformed);
    }
}
