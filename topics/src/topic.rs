//! Topic names of the Alibaba Link protocol that fleetgate speaks (docs/DESIGN.md §3), parsed and
//! formatted in one place.
//!
//! [`Topic::parse`] sits on the ingest hot path, so it never allocates: it splits the name into
//! at most eight `/` segments on the stack and borrows product key, device name and event
//! identifier from the input ([`Topic`] holds `Cow`s; [`Topic::into_owned`] detaches it when it has
//! to outlive the packet). Matching is exact: wildcards (`+`, `#`), empty segments, NUL and
//! unknown shapes give `None`, so a topic filter can never be mistaken for a topic name.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

/// Who publishes on a topic: the device (`Up`) or the gateway (`Down`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a topic kind label did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("unknown topic kind `{0}`")]
    UnknownKind(String),
}

/// Declares `TopicKind` together with its label, direction and template, so that `ALL` and the
/// per-kind tables can never miss a variant.
macro_rules! topic_kinds {
    ($( $(#[$doc:meta])* $variant:ident => $label:literal, $dir:ident, $template:literal; )*) => {
        /// The shape of a [`Topic`] without its product key, device name or identifier. `Copy`
        /// and with stable [`as_str`](TopicKind::as_str) labels, so metrics can use it directly.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum TopicKind {
            $( $(#[$doc])* $variant, )*
        }

        impl TopicKind {
            /// Every kind, in declaration order.
            pub const ALL: &'static [TopicKind] = &[$(TopicKind::$variant),*];

            /// Stable label for metrics and the catalog (`inform`, `firmware_get_reply`, …).
            pub fn as_str(self) -> &'static str {
                match self { $(TopicKind::$variant => $label,)* }
            }

            pub fn direction(self) -> Direction {
                match self { $(TopicKind::$variant => Direction::$dir,)* }
            }

            /// The topic template with `{pk}`, `{dn}` and (event topics) `{identifier}`.
            pub fn template(self) -> &'static str {
                match self { $(TopicKind::$variant => $template,)* }
            }
        }

        impl FromStr for TopicKind {
            type Err = TopicError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($label => Ok(TopicKind::$variant),)*
                    _ => Err(TopicError::UnknownKind(s.to_owned())),
                }
            }
        }
    };
}

topic_kinds! {
    /// Device reports its firmware version (per module).
    Inform => "inform", Up, "/ota/device/inform/{pk}/{dn}";
    /// Device reports upgrade progress or a failure code.
    Progress => "progress", Up, "/ota/device/progress/{pk}/{dn}";
    /// Gateway pushes an upgrade.
    Upgrade => "upgrade", Down, "/ota/device/upgrade/{pk}/{dn}";
    /// Device asks for its pending upgrade.
    FirmwareGet => "firmware_get", Up, "/sys/{pk}/{dn}/thing/ota/firmware/get";
    /// Gateway answers `firmware/get`.
    FirmwareGetReply => "firmware_get_reply", Down, "/sys/{pk}/{dn}/thing/ota/firmware/get_reply";
    /// Device posts TSL properties.
    PropertyPost => "property_post", Up, "/sys/{pk}/{dn}/thing/event/property/post";
    /// Gateway acknowledges a property post.
    PropertyPostReply => "property_post_reply", Down, "/sys/{pk}/{dn}/thing/event/property/post_reply";
    /// Device posts a TSL event.
    EventPost => "event_post", Up, "/sys/{pk}/{dn}/thing/event/{identifier}/post";
    /// Gateway acknowledges an event post.
    EventPostReply => "event_post_reply", Down, "/sys/{pk}/{dn}/thing/event/{identifier}/post_reply";
}

impl TopicKind {
    /// The kind the gateway answers on, for up kinds that have a reply.
    pub fn reply_kind(self) -> Option<TopicKind> {
        match self {
            TopicKind::FirmwareGet => Some(TopicKind::FirmwareGetReply),
            TopicKind::PropertyPost => Some(TopicKind::PropertyPostReply),
            TopicKind::EventPost => Some(TopicKind::EventPostReply),
            // The vendor protocol has no reply for the OTA inform/progress topics.
            TopicKind::Inform
            | TopicKind::Progress
            | TopicKind::Upgrade
            | TopicKind::FirmwareGetReply
            | TopicKind::PropertyPostReply
            | TopicKind::EventPostReply => None,
        }
    }

    /// Whether the template carries an `{identifier}` segment.
    pub fn has_identifier(self) -> bool {
        matches!(self, TopicKind::EventPost | TopicKind::EventPostReply)
    }
}

impl fmt::Display for TopicKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A concrete topic name. Fields borrow from the parsed input where possible.
///
/// Constructed by hand, the fields must be valid segments (non-empty, no `/`, `+`, `#` or NUL;
/// an event identifier other than `property`) for the name to parse back;
/// [`Topic::from_kind`] checks that.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic<'a> {
    /// `/ota/device/inform/{pk}/{dn}`
    OtaInform { pk: Cow<'a, str>, dn: Cow<'a, str> },
    /// `/ota/device/progress/{pk}/{dn}`
    OtaProgress { pk: Cow<'a, str>, dn: Cow<'a, str> },
    /// `/ota/device/upgrade/{pk}/{dn}`
    OtaUpgrade { pk: Cow<'a, str>, dn: Cow<'a, str> },
    /// `/sys/{pk}/{dn}/thing/ota/firmware/get`
    FirmwareGet { pk: Cow<'a, str>, dn: Cow<'a, str> },
    /// `/sys/{pk}/{dn}/thing/ota/firmware/get_reply`
    FirmwareGetReply { pk: Cow<'a, str>, dn: Cow<'a, str> },
    /// `/sys/{pk}/{dn}/thing/event/property/post`
    PropertyPost { pk: Cow<'a, str>, dn: Cow<'a, str> },
    /// `/sys/{pk}/{dn}/thing/event/property/post_reply`
    PropertyPostReply { pk: Cow<'a, str>, dn: Cow<'a, str> },
    /// `/sys/{pk}/{dn}/thing/event/{identifier}/post` (identifier is never `property`)
    EventPost {
        pk: Cow<'a, str>,
        dn: Cow<'a, str>,
        identifier: Cow<'a, str>,
    },
    /// `/sys/{pk}/{dn}/thing/event/{identifier}/post_reply`
    EventPostReply {
        pk: Cow<'a, str>,
        dn: Cow<'a, str>,
        identifier: Cow<'a, str>,
    },
}

/// The most segments any topic has (`""/sys/pk/dn/thing/event/x/post`).
const MAX_SEGMENTS: usize = 8;

/// A segment that can stand for a product key, device name or identifier.
fn valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| matches!(b, b'/' | b'+' | b'#' | 0))
}

impl<'a> Topic<'a> {
    /// Parses a topic name; `None` for anything that is not exactly one of the topics of
    /// [`TopicKind`] (including filters with `+`/`#` and names with empty segments).
    pub fn parse(topic: &'a str) -> Option<Topic<'a>> {
        let mut seg = [""; MAX_SEGMENTS];
        let mut n = 0;
        for part in topic.split('/') {
            if n == MAX_SEGMENTS {
                return None;
            }
            seg[n] = part;
            n += 1;
        }
        let b = Cow::Borrowed;
        // Matching the slice by value copies the `&'a str`s out, keeping the input's lifetime.
        let t = match seg[..n] {
            ["", "ota", "device", kind, pk, dn] => {
                if !valid_segment(pk) || !valid_segment(dn) {
                    return None;
                }
                let (pk, dn) = (b(pk), b(dn));
                match kind {
                    "inform" => Topic::OtaInform { pk, dn },
                    "progress" => Topic::OtaProgress { pk, dn },
                    "upgrade" => Topic::OtaUpgrade { pk, dn },
                    _ => return None,
                }
            }
            ["", "sys", pk, dn, "thing", a, c, d] => {
                if !valid_segment(pk) || !valid_segment(dn) {
                    return None;
                }
                let (pk, dn) = (b(pk), b(dn));
                match (a, c, d) {
                    ("ota", "firmware", "get") => Topic::FirmwareGet { pk, dn },
                    ("ota", "firmware", "get_reply") => Topic::FirmwareGetReply { pk, dn },
                    ("event", "property", "post") => Topic::PropertyPost { pk, dn },
                    ("event", "property", "post_reply") => Topic::PropertyPostReply { pk, dn },
                    ("event", id, "post") if valid_segment(id) => Topic::EventPost {
                        pk,
                        dn,
                        identifier: b(id),
                    },
                    ("event", id, "post_reply") if valid_segment(id) => Topic::EventPostReply {
                        pk,
                        dn,
                        identifier: b(id),
                    },
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some(t)
    }

    /// Builds the topic of `kind` for a device; `identifier` is needed exactly for the event
    /// kinds. `None` when a part is not a valid segment or the identifier is missing, superfluous
    /// or `property` (property posts have their own kind).
    pub fn from_kind(
        kind: TopicKind,
        pk: impl Into<Cow<'a, str>>,
        dn: impl Into<Cow<'a, str>>,
        identifier: Option<&'a str>,
    ) -> Option<Topic<'a>> {
        let (pk, dn) = (pk.into(), dn.into());
        if !valid_segment(&pk) || !valid_segment(&dn) {
            return None;
        }
        if kind.has_identifier() != identifier.is_some() {
            return None;
        }
        let ident = || match identifier {
            Some(id) if valid_segment(id) && id != "property" => Some(Cow::Borrowed(id)),
            _ => None,
        };
        Some(match kind {
            TopicKind::Inform => Topic::OtaInform { pk, dn },
            TopicKind::Progress => Topic::OtaProgress { pk, dn },
            TopicKind::Upgrade => Topic::OtaUpgrade { pk, dn },
            TopicKind::FirmwareGet => Topic::FirmwareGet { pk, dn },
            TopicKind::FirmwareGetReply => Topic::FirmwareGetReply { pk, dn },
            TopicKind::PropertyPost => Topic::PropertyPost { pk, dn },
            TopicKind::PropertyPostReply => Topic::PropertyPostReply { pk, dn },
            TopicKind::EventPost => Topic::EventPost {
                pk,
                dn,
                identifier: ident()?,
            },
            TopicKind::EventPostReply => Topic::EventPostReply {
                pk,
                dn,
                identifier: ident()?,
            },
        })
    }

    /// The same topic owning its strings, e.g. to send it through a channel.
    pub fn into_owned(self) -> Topic<'static> {
        fn o(c: Cow<'_, str>) -> Cow<'static, str> {
            Cow::Owned(c.into_owned())
        }
        match self {
            Topic::OtaInform { pk, dn } => Topic::OtaInform {
                pk: o(pk),
                dn: o(dn),
            },
            Topic::OtaProgress { pk, dn } => Topic::OtaProgress {
                pk: o(pk),
                dn: o(dn),
            },
            Topic::OtaUpgrade { pk, dn } => Topic::OtaUpgrade {
                pk: o(pk),
                dn: o(dn),
            },
            Topic::FirmwareGet { pk, dn } => Topic::FirmwareGet {
                pk: o(pk),
                dn: o(dn),
            },
            Topic::FirmwareGetReply { pk, dn } => Topic::FirmwareGetReply {
                pk: o(pk),
                dn: o(dn),
            },
            Topic::PropertyPost { pk, dn } => Topic::PropertyPost {
                pk: o(pk),
                dn: o(dn),
            },
            Topic::PropertyPostReply { pk, dn } => Topic::PropertyPostReply {
                pk: o(pk),
                dn: o(dn),
            },
            Topic::EventPost { pk, dn, identifier } => Topic::EventPost {
                pk: o(pk),
                dn: o(dn),
                identifier: o(identifier),
            },
            Topic::EventPostReply { pk, dn, identifier } => Topic::EventPostReply {
                pk: o(pk),
                dn: o(dn),
                identifier: o(identifier),
            },
        }
    }

    pub fn kind(&self) -> TopicKind {
        match self {
            Topic::OtaInform { .. } => TopicKind::Inform,
            Topic::OtaProgress { .. } => TopicKind::Progress,
            Topic::OtaUpgrade { .. } => TopicKind::Upgrade,
            Topic::FirmwareGet { .. } => TopicKind::FirmwareGet,
            Topic::FirmwareGetReply { .. } => TopicKind::FirmwareGetReply,
            Topic::PropertyPost { .. } => TopicKind::PropertyPost,
            Topic::PropertyPostReply { .. } => TopicKind::PropertyPostReply,
            Topic::EventPost { .. } => TopicKind::EventPost,
            Topic::EventPostReply { .. } => TopicKind::EventPostReply,
        }
    }

    pub fn direction(&self) -> Direction {
        self.kind().direction()
    }

    fn parts(&self) -> (&str, &str, Option<&str>) {
        match self {
            Topic::OtaInform { pk, dn }
            | Topic::OtaProgress { pk, dn }
            | Topic::OtaUpgrade { pk, dn }
            | Topic::FirmwareGet { pk, dn }
            | Topic::FirmwareGetReply { pk, dn }
            | Topic::PropertyPost { pk, dn }
            | Topic::PropertyPostReply { pk, dn } => (pk, dn, None),
            Topic::EventPost { pk, dn, identifier }
            | Topic::EventPostReply { pk, dn, identifier } => (pk, dn, Some(identifier)),
        }
    }

    pub fn product_key(&self) -> &str {
        self.parts().0
    }

    pub fn device_name(&self) -> &str {
        self.parts().1
    }

    /// The TSL event identifier of event topics.
    pub fn identifier(&self) -> Option<&str> {
        self.parts().2
    }

    /// The topic the gateway answers on, for up topics that have a reply. Borrows from `self`.
    pub fn reply_topic(&self) -> Option<Topic<'_>> {
        let (pk, dn, identifier) = self.parts();
        let (pk, dn) = (Cow::Borrowed(pk), Cow::Borrowed(dn));
        match self.kind().reply_kind()? {
            TopicKind::FirmwareGetReply => Some(Topic::FirmwareGetReply { pk, dn }),
            TopicKind::PropertyPostReply => Some(Topic::PropertyPostReply { pk, dn }),
            TopicKind::EventPostReply => Some(Topic::EventPostReply {
                pk,
                dn,
                identifier: Cow::Borrowed(identifier?),
            }),
            _ => None,
        }
    }
}

impl fmt::Display for Topic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::OtaInform { pk, dn } => write!(f, "/ota/device/inform/{pk}/{dn}"),
            Topic::OtaProgress { pk, dn } => write!(f, "/ota/device/progress/{pk}/{dn}"),
            Topic::OtaUpgrade { pk, dn } => write!(f, "/ota/device/upgrade/{pk}/{dn}"),
            Topic::FirmwareGet { pk, dn } => write!(f, "/sys/{pk}/{dn}/thing/ota/firmware/get"),
            Topic::FirmwareGetReply { pk, dn } => {
                write!(f, "/sys/{pk}/{dn}/thing/ota/firmware/get_reply")
            }
            Topic::PropertyPost { pk, dn } => write!(f, "/sys/{pk}/{dn}/thing/event/property/post"),
            Topic::PropertyPostReply { pk, dn } => {
                write!(f, "/sys/{pk}/{dn}/thing/event/property/post_reply")
            }
            Topic::EventPost { pk, dn, identifier } => {
                write!(f, "/sys/{pk}/{dn}/thing/event/{identifier}/post")
            }
            Topic::EventPostReply { pk, dn, identifier } => {
                write!(f, "/sys/{pk}/{dn}/thing/event/{identifier}/post_reply")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(s: &str) -> Topic<'_> {
        Topic::parse(s).unwrap_or_else(|| panic!("{s} should parse"))
    }

    #[test]
    fn parses_every_topic_and_formats_back() {
        let cases = [
            ("/ota/device/inform/pk1/dn1", TopicKind::Inform),
            ("/ota/device/progress/pk1/dn1", TopicKind::Progress),
            ("/ota/device/upgrade/pk1/dn1", TopicKind::Upgrade),
            (
                "/sys/pk1/dn1/thing/ota/firmware/get",
                TopicKind::FirmwareGet,
            ),
            (
                "/sys/pk1/dn1/thing/ota/firmware/get_reply",
                TopicKind::FirmwareGetReply,
            ),
            (
                "/sys/pk1/dn1/thing/event/property/post",
                TopicKind::PropertyPost,
            ),
            (
                "/sys/pk1/dn1/thing/event/property/post_reply",
                TopicKind::PropertyPostReply,
            ),
            ("/sys/pk1/dn1/thing/event/alarm/post", TopicKind::EventPost),
            (
                "/sys/pk1/dn1/thing/event/alarm/post_reply",
                TopicKind::EventPostReply,
            ),
        ];
        for (s, kind) in cases {
            let t = parse_ok(s);
            assert_eq!(t.kind(), kind, "{s}");
            assert_eq!(t.product_key(), "pk1");
            assert_eq!(t.device_name(), "dn1");
            assert_eq!(t.direction(), kind.direction());
            assert_eq!(t.to_string(), s);
            assert_eq!(t.identifier().is_some(), kind.has_identifier());
            assert_eq!(t.clone().into_owned(), t);
        }
    }

    #[test]
    fn parse_borrows_instead_of_allocating() {
        let s = String::from("/sys/a1B2c3/dev-01/thing/event/overheat/post");
        let t = parse_ok(&s);
        match &t {
            Topic::EventPost { pk, dn, identifier } => {
                assert!(matches!(pk, Cow::Borrowed(_)));
                assert!(matches!(dn, Cow::Borrowed(_)));
                assert!(matches!(identifier, Cow::Borrowed(_)));
                assert_eq!(identifier, "overheat");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn property_is_never_an_event_identifier() {
        assert_eq!(
            parse_ok("/sys/p/d/thing/event/property/post").kind(),
            TopicKind::PropertyPost
        );
        assert_eq!(
            Topic::from_kind(TopicKind::EventPost, "p", "d", Some("property")),
            None
        );
    }

    #[test]
    fn rejects_wildcards_empty_segments_and_wrong_shapes() {
        for bad in [
            "",
            "/",
            "ota/device/inform/pk/dn",        // no leading slash
            "/ota/device/inform/pk",          // too few segments
            "/ota/device/inform/pk/dn/extra", // too many
            "/ota/device/inform/pk/dn/",      // trailing slash = empty segment
            "/ota/device/inform//dn",         // empty pk
            "/ota/device/inform/pk/",         // empty dn
            "/ota/device/inform/+/dn",        // wildcard pk
            "/ota/device/inform/pk/#",        // wildcard dn
            "/ota/device/inform/p+k/dn",      // wildcard inside a segment
            "/ota/device/reboot/pk/dn",       // unknown OTA topic
            "/ota/device/+/pk/dn",
            "/sys/pk/dn/thing/event/+/post", // wildcard identifier
            "/sys/pk/dn/thing/event/#",
            "/sys/pk/dn/thing/event//post", // empty identifier
            "/sys//dn/thing/event/property/post",
            "/sys/pk/dn/thing/event/property/post/x/y/z",
            "/sys/pk/dn/thing/event/property",
            "/sys/pk/dn/thing/service/property/set",
            "/sys/pk/dn/thing/ota/firmware/put",
            "/sys/pk/dn/thing/ota/firmware/get_reply/",
            "/sys/pk/dn/thing/ota/firmware/get_reply2",
            "/sys/pk/dn/other/event/property/post",
            "//ota/device/inform/pk/dn",
            "/OTA/device/inform/pk/dn", // case matters
            "/ota/device/inform/pk/d\0n",
            "#",
            "+/+/+",
        ] {
            assert_eq!(Topic::parse(bad), None, "{bad:?} must not parse");
        }
    }

    #[test]
    fn reply_topics() {
        let get = parse_ok("/sys/p/d/thing/ota/firmware/get");
        assert_eq!(
            get.reply_topic().unwrap().to_string(),
            "/sys/p/d/thing/ota/firmware/get_reply"
        );
        let prop = parse_ok("/sys/p/d/thing/event/property/post");
        assert_eq!(
            prop.reply_topic().unwrap().to_string(),
            "/sys/p/d/thing/event/property/post_reply"
        );
        let ev = parse_ok("/sys/p/d/thing/event/alarm/post");
        let reply = ev.reply_topic().unwrap();
        assert_eq!(reply.kind(), TopicKind::EventPostReply);
        assert_eq!(reply.identifier(), Some("alarm"));
        assert_eq!(reply.to_string(), "/sys/p/d/thing/event/alarm/post_reply");
        for no_reply in [
            "/ota/device/inform/p/d",
            "/ota/device/progress/p/d",
            "/ota/device/upgrade/p/d",
            "/sys/p/d/thing/ota/firmware/get_reply",
            "/sys/p/d/thing/event/alarm/post_reply",
        ] {
            assert_eq!(parse_ok(no_reply).reply_topic(), None, "{no_reply}");
        }
        for kind in TopicKind::ALL {
            if let Some(r) = kind.reply_kind() {
                assert_eq!(kind.direction(), Direction::Up);
                assert_eq!(r.direction(), Direction::Down);
            }
        }
    }

    #[test]
    fn from_kind_validates() {
        for &kind in TopicKind::ALL {
            let ident = kind.has_identifier().then_some("alarm");
            let t = Topic::from_kind(kind, "pk", "dn", ident).unwrap();
            assert_eq!(t.kind(), kind);
            assert_eq!(Topic::parse(&t.to_string()), Some(t.clone()));
            // Identifier missing or superfluous.
            let wrong = if ident.is_some() { None } else { Some("alarm") };
            assert_eq!(Topic::from_kind(kind, "pk", "dn", wrong), None);
            assert_eq!(Topic::from_kind(kind, "p/k", "dn", ident), None);
            assert_eq!(Topic::from_kind(kind, "pk", "", ident), None);
            assert_eq!(Topic::from_kind(kind, "pk", "+", ident), None);
        }
    }

    #[test]
    fn kind_labels_are_stable_and_round_trip() {
        let labels: Vec<&str> = TopicKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            labels,
            [
                "inform",
                "progress",
                "upgrade",
                "firmware_get",
                "firmware_get_reply",
                "property_post",
                "property_post_reply",
                "event_post",
                "event_post_reply"
            ]
        );
        for &k in TopicKind::ALL {
            assert_eq!(k.as_str().parse::<TopicKind>(), Ok(k));
            // serde uses the same label (the catalog is deserialised with it).
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
        }
        assert!("nope".parse::<TopicKind>().is_err());
    }
}
