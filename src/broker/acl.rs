//! Topic isolation: which topics and filters belong to a device `(pk, dn)`.
//!
//! Pure functions, no state. A topic (or a subscription filter) belongs to a device when it has
//! one of the vendor's per-device shapes with the device's own `{pk}/{dn}` in the right place:
//!
//! | shape | tail after `{pk}/{dn}` |
//! |---|---|
//! | `/ota/device/{kind}/{pk}/{dn}` | none |
//! | `/shadow/{op}/{pk}/{dn}` | none |
//! | `/sys/{pk}/{dn}/…` | one or more segments |
//! | `/{pk}/{dn}/…` (custom topics, `/{pk}/{dn}/user/…`) | one or more segments |
//! | `/ext/{kind}/{pk}/{dn}[/…]` (`ntp`, `session`, `error`, …; not `rrpc`) | zero or more |
//! | `/ext/rrpc/{message_id}/{pk}/{dn}/…` | one or more |
//!
//! Segments are compared exactly (pk `a1` never matches `a10`). In a filter, wildcards (`+`, `#`)
//! may appear only in the tail, after the `{pk}/{dn}` segments — with one exception: the RRPC
//! message id may be `+`, because the segments after it still pin the device. So
//! `/sys/pk/dn/#` is allowed while `/sys/+/dn/#`, `/sys/#` and `#` are refused.
//!
//! A product key that is itself one of the first segments above (`sys`, `ota`, `ext`, `shadow`,
//! …) does not get the bare `/{pk}/{dn}/…` shape: otherwise product `sys` would own every
//! `/sys/{dn}/…` topic, i.e. other devices' system topics. The registry should refuse such product
//! keys anyway.

use smallvec::SmallVec;

/// First segments that are namespaces of their own and never a product key.
pub const RESERVED_FIRST_SEGMENTS: [&str; 6] = ["sys", "ota", "ext", "shadow", "as", "broadcast"];

/// Whether `topic` is a valid topic name to publish on: non-empty, no wildcard, no NUL and not a
/// `$`-prefixed broker topic.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && !topic.starts_with('$')
        && !topic.contains(['+', '#', '\0'])
        && topic.len() <= u16::MAX as usize
}

/// Whether `filter` is a well-formed MQTT subscription filter (`#` only as the whole last
/// segment, `+` only as a whole segment, non-empty, no NUL).
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') || filter.len() > u16::MAX as usize {
        return false;
    }
    let segments: Vec<&str> = filter.split('/').collect();
    let last = segments.len() - 1;
    segments.iter().enumerate().all(|(i, s)| match *s {
        "#" => i == last,
        "+" => true,
        s => !s.contains(['+', '#']),
    })
}

/// Whether a device may publish on `topic`.
pub fn topic_allowed(product_key: &str, device_name: &str, topic: &str) -> bool {
    valid_topic_name(topic) && owned(product_key, device_name, topic, false)
}

/// Whether a device may subscribe to (or unsubscribe from) `filter`.
pub fn filter_allowed(product_key: &str, device_name: &str, filter: &str) -> bool {
    valid_filter(filter)
        && !filter.starts_with('$')
        && owned(product_key, device_name, filter, true)
}

/// The one device that owns `topic`: `(product_key, device_name)`, or `None` when the topic has
/// none of the per-device shapes. Every filter a device may subscribe to names its own
/// `{pk}/{dn}` before any wildcard (the RRPC id aside, which comes before them in a fixed shape),
/// so the owner is the only device whose subscriptions can match the topic.
///
/// One exception makes a topic have no single owner: the server-side `_ss=1` subscription
/// `/ext/rrpc/+/sys/{pk}/{dn}/#` is not checked by this ACL, and the topics it matches are owned,
/// by shape, by a product called `sys`. So a product key that is a reserved first segment is
/// never reported as an owner.
pub fn topic_owner(topic: &str) -> Option<(&str, &str)> {
    let mut segments = topic.split('/');
    if segments.next() != Some("") {
        return None;
    }
    let rest: Vec<&str> = segments.collect();
    let device = match rest.as_slice() {
        ["ota", "device", _, device @ ..]
        | ["shadow", _, device @ ..]
        | ["sys", device @ ..]
        | ["ext", "rrpc", _, device @ ..] => device,
        ["ext", _, device @ ..] => device,
        device => device,
    };
    let [pk, dn, ..] = device else {
        return None;
    };
    if RESERVED_FIRST_SEGMENTS.contains(pk) {
        return None;
    }
    // The candidate is confirmed by the ACL itself, so the two can never disagree.
    topic_allowed(pk, dn, topic).then_some((*pk, *dn))
}

/// What may follow the `{pk}/{dn}` segments.
#[derive(Clone, Copy)]
enum Tail {
    /// Nothing.
    None,
    /// At least one segment.
    Some,
    /// Zero or more segments.
    Any,
}

fn is_wildcard(segment: &str) -> bool {
    segment == "+" || segment == "#"
}

/// A literal (non-wildcard, non-empty) segment.
fn literal(segment: &str) -> bool {
    !segment.is_empty() && !is_wildcard(segment)
}

fn owned(pk: &str, dn: &str, name: &str, is_filter: bool) -> bool {
    if pk.is_empty() || dn.is_empty() {
        return false;
    }
    // On the stack: every PUBLISH passes here (a topic of more segments spills to the heap).
    let segments: SmallVec<[&str; 12]> = name.split('/').collect();
    // Every per-device shape starts with `/`, so the first segment is empty.
    let Some(("", rest)) = segments.split_first().map(|(first, rest)| (*first, rest)) else {
        return false;
    };
    let device_then = |rest: &[&str], tail: Tail| -> bool {
        match rest {
            [p, d, after @ ..] if *p == pk && *d == dn => match tail {
                Tail::None => after.is_empty(),
                Tail::Some => !after.is_empty(),
                Tail::Any => true,
            },
            _ => false,
        }
    };
    match rest {
        ["ota", "device", kind, after @ ..] => literal(kind) && device_then(after, Tail::None),
        ["shadow", op, after @ ..] => literal(op) && device_then(after, Tail::None),
        ["sys", after @ ..] => device_then(after, Tail::Some),
        ["ext", "rrpc", id, after @ ..] => {
            let id_ok = literal(id) || (is_filter && *id == "+");
            id_ok && device_then(after, Tail::Some)
        }
        ["ext", kind, after @ ..] => literal(kind) && device_then(after, Tail::Any),
        [first, ..] if RESERVED_FIRST_SEGMENTS.contains(first) => false,
        _ => !RESERVED_FIRST_SEGMENTS.contains(&pk) && device_then(rest, Tail::Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PK: &str = "a1";
    const DN: &str = "dev1";

    #[test]
    fn topics() {
        let table: &[(&str, bool)] = &[
            ("/ota/device/inform/a1/dev1", true),
            ("/ota/device/progress/a1/dev1", true),
            ("/ota/device/upgrade/a1/dev1", true),
            ("/ota/device/request/a1/dev1", true),
            ("/ota/device/inform/a1/dev1/extra", false),
            ("/ota/device/inform/a1/dev2", false),
            ("/ota/device/inform/a10/dev1", false),
            ("/ota/device/inform/a/dev1", false),
            ("/ota/device//a1/dev1", false),
            ("/ota/device/inform/a1", false),
            ("/sys/a1/dev1/thing/event/property/post", true),
            ("/sys/a1/dev1/thing/ota/firmware/get", true),
            ("/sys/a1/dev1/", true),
            ("/sys/a1/dev1", false),
            ("/sys/a1/dev10/thing/event/property/post", false),
            ("/sys/a10/dev1/thing/event/property/post", false),
            ("/sys/a2/dev1/thing/event/property/post", false),
            ("sys/a1/dev1/thing/event/property/post", false),
            ("/a1/dev1/user/update", true),
            ("/a1/dev1/user/get", true),
            ("/a1/dev1", false),
            ("/a1/dev2/user/update", false),
            ("/a10/dev1/user/update", false),
            ("/ext/ntp/a1/dev1/request", true),
            ("/ext/session/a1/dev1/combine/login", true),
            ("/ext/error/a1/dev1", true),
            ("/ext/ntp/a2/dev1/request", false),
            ("/ext/rrpc/123/a1/dev1/user/get", true),
            ("/ext/rrpc/123/a2/dev1/user/get", false),
            ("/ext/rrpc/a1/dev1/x", false),
            ("/shadow/update/a1/dev1", true),
            ("/shadow/get/a1/dev2", false),
            ("/as/mqtt/status/a1/dev1", false),
            ("", false),
            ("/", false),
            ("#", false),
            ("/sys/a1/dev1/#", false),
            ("/sys/a1/dev1/+", false),
            ("$SYS/a1/dev1/x", false),
            ("/sys/a1/dev1/x\0", false),
        ];
        for (topic, expected) in table {
            assert_eq!(topic_allowed(PK, DN, topic), *expected, "topic {topic:?}");
        }
    }

    #[test]
    fn filters() {
        let table: &[(&str, bool)] = &[
            ("/ota/device/upgrade/a1/dev1", true),
            ("/ota/device/+/a1/dev1", false),
            ("/ota/device/upgrade/+/dev1", false),
            ("/ota/device/upgrade/a1/+", false),
            ("/ota/device/upgrade/a1/dev2", false),
            ("/ota/device/upgrade/a1/dev1/#", false),
            ("/sys/a1/dev1/#", true),
            ("/sys/a1/dev1/thing/+/property/post_reply", true),
            ("/sys/a1/dev1/thing/event/+/post_reply", true),
            ("/sys/a1/dev1/+", true),
            ("/sys/+/dev1/#", false),
            ("/sys/a1/+/#", false),
            ("/sys/#", false),
            ("/sys/a1/#", false),
            ("/sys/a1/dev1#", false),
            ("/sys/a1/dev1/#/x", false),
            ("/sys/a1/dev1/a+b", false),
            ("#", false),
            ("+/a1/dev1/x", false),
            ("/+/dev1/user/#", false),
            ("/a1/dev1/user/#", true),
            ("/a1/dev1/#", true),
            ("/a1/+/user/#", false),
            ("/ext/rrpc/+/a1/dev1/user/get", true),
            ("/ext/rrpc/+/a1/dev1/#", true),
            ("/ext/rrpc/+/#", false),
            ("/ext/rrpc/+/+/dev1/x", false),
            ("/ext/ntp/a1/dev1/response", true),
            ("/ext/+/a1/dev1/response", false),
            ("/ext/ntp/a1/dev1/#", true),
            ("$share/g/sys/a1/dev1/#", false),
            ("", false),
        ];
        for (filter, expected) in table {
            assert_eq!(
                filter_allowed(PK, DN, filter),
                *expected,
                "filter {filter:?}"
            );
        }
    }

    #[test]
    fn topic_owners() {
        let table: &[(&str, Option<(&str, &str)>)] = &[
            ("/ota/device/upgrade/a1/dev1", Some(("a1", "dev1"))),
            (
                "/sys/a1/dev1/thing/event/property/post_reply",
                Some(("a1", "dev1")),
            ),
            (
                "/sys/a1/dev1/thing/ota/firmware/get_reply",
                Some(("a1", "dev1")),
            ),
            ("/a1/dev1/user/get", Some(("a1", "dev1"))),
            ("/ext/rrpc/123/a1/dev1/user/get", Some(("a1", "dev1"))),
            ("/ext/ntp/a1/dev1/response", Some(("a1", "dev1"))),
            ("/ext/error/a1/dev1", Some(("a1", "dev1"))),
            ("/shadow/get/a1/dev1", Some(("a1", "dev1"))),
            ("/sys/sys/dev1/thing/x", None),
            ("/ext/rrpc/123/sys/a1/dev1/thing/service/x", None),
            ("/sys/a1/dev1", None),
            ("/ota/device/upgrade/a1/dev1/extra", None),
            ("/ota/a1/dev1", None),
            ("/as/mqtt/status/a1/dev1", None),
            ("/a1/dev1", None),
            ("a1/dev1/user/get", None),
            ("/sys/a1/dev1/+", None),
            ("$SYS/a1/dev1/x", None),
            ("", None),
            ("/", None),
        ];
        for (topic, expected) in table {
            assert_eq!(topic_owner(topic), *expected, "topic {topic:?}");
            // The owner is exactly the device the ACL lets publish there.
            if let Some((pk, dn)) = expected {
                assert!(topic_allowed(pk, dn, topic));
            }
        }
    }

    #[test]
    fn reserved_product_keys_do_not_get_bare_topics() {
        // Product `sys` must not own device `x`'s system topics of product `dev1`.
        assert!(!topic_allowed(
            "sys",
            "dev1",
            "/sys/dev1/thing/event/property/post"
        ));
        assert!(!filter_allowed("sys", "dev1", "/sys/dev1/#"));
        // Its own system topics still work.
        assert!(topic_allowed(
            "sys",
            "dev1",
            "/sys/sys/dev1/thing/event/property/post"
        ));
        // Other products never use a reserved first segment as a bare product key.
        assert!(!topic_allowed("a1", "dev1", "/ota/a1/dev1"));
    }

    #[test]
    fn filter_syntax() {
        for ok in ["a", "a/b", "+", "#", "a/+/b", "a/#", "/", "+/+", "/#"] {
            assert!(valid_filter(ok), "{ok:?}");
        }
        for bad in ["", "a#", "a/#/b", "a+/b", "#/a", "a/b+", "a\0b"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn topic_name_syntax() {
        assert!(valid_topic_name("/a/b"));
        for bad in ["", "a/+", "a/#", "$SYS/x", "a\0"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
    }
}
