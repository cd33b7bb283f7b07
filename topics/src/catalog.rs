//! The topic catalog: `topics/catalog.toml`, embedded at compile time and parsed once.
//!
//! It is the one place that says, per topic, which way it flows, at which QoS it is published,
//! what it is for and what its payloads look like (valid and invalid examples). The tests below
//! tie it to [`TopicKind`], [`Topic::parse`] and the payload types, and `README.md` to it, so none
//! of them can drift apart.

use crate::topic::{Direction, TopicKind};
use serde::Deserialize;
use std::sync::OnceLock;

/// The embedded catalog source.
pub const CATALOG_TOML: &str = include_str!("../catalog.toml");

/// One topic of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// The kind, by its label (`inform`, `property_post`, …).
    pub name: TopicKind,
    /// `/ota/device/inform/{pk}/{dn}` etc.; always [`TopicKind::template`] of `name`.
    pub template: String,
    pub direction: Direction,
    /// QoS the publisher uses (0 or 1); the catalog's header explains each choice.
    pub qos: u8,
    /// The Rust type in [`crate::payload`] that parses this topic's payloads.
    pub payload: String,
    pub description: String,
    /// Payloads that parse (at least one).
    pub examples: Vec<String>,
    /// Payloads that must be refused.
    #[serde(default)]
    pub invalid_examples: Vec<String>,
}

/// Why a catalog source is not a valid catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("topic `{0}` appears more than once")]
    Duplicate(TopicKind),
    #[error("topic `{0}` is missing")]
    Missing(TopicKind),
    #[error("topic `{kind}`: template `{found}` is not `{expected}`")]
    Template {
        kind: TopicKind,
        expected: &'static str,
        found: String,
    },
    #[error("topic `{0}`: direction disagrees with TopicKind::direction")]
    Direction(TopicKind),
    #[error("topic `{0}`: qos must be 0 or 1")]
    Qos(TopicKind),
    #[error("topic `{0}` has no example payload")]
    NoExample(TopicKind),
}

/// Every topic, in [`TopicKind::ALL`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    topics: Vec<TopicSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    topic: Vec<TopicSpec>,
}

impl Catalog {
    /// Parses and checks a catalog: every kind exactly once, templates and directions as in
    /// [`TopicKind`], QoS 0 or 1, at least one example each.
    pub fn parse(source: &str) -> Result<Catalog, CatalogError> {
        let file: CatalogFile = toml::from_str(source)?;
        let mut topics = file.topic;
        topics.sort_by_key(|t| t.name);
        for pair in topics.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(CatalogError::Duplicate(pair[0].name));
            }
        }
        for &kind in TopicKind::ALL {
            let spec = topics
                .iter()
                .find(|t| t.name == kind)
                .ok_or(CatalogError::Missing(kind))?;
            if spec.template != kind.template() {
                return Err(CatalogError::Template {
                    kind,
                    expected: kind.template(),
                    found: spec.template.clone(),
                });
            }
            if spec.direction != kind.direction() {
                return Err(CatalogError::Direction(kind));
            }
            if spec.qos > 1 {
                return Err(CatalogError::Qos(kind));
            }
            if spec.examples.is_empty() {
                return Err(CatalogError::NoExample(kind));
            }
        }
        Ok(Catalog { topics })
    }

    /// Every topic, in [`TopicKind::ALL`] order.
    pub fn topics(&self) -> &[TopicSpec] {
        &self.topics
    }

    /// The entry of `kind` (every kind has one: [`Catalog::parse`] checks it).
    pub fn get(&self, kind: TopicKind) -> &TopicSpec {
        // Sorted by kind and complete, so the kind's position in ALL is its index.
        let i = TopicKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default();
        &self.topics[i]
    }

    /// The QoS to publish `kind` with.
    pub fn qos(&self, kind: TopicKind) -> u8 {
        self.get(kind).qos
    }
}

/// The embedded catalog, parsed on first use.
pub fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        // A compile-time constant checked by the tests below, never input from the network.
        Catalog::parse(CATALOG_TOML)
            .unwrap_or_else(|e| panic!("embedded topics/catalog.toml is invalid: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::*;
    use crate::topic::Topic;

    const SAMPLE_PK: &str = "a1B2c3D4e5F";
    const SAMPLE_DN: &str = "sensor-0001";
    /// The identifier the catalog's event examples use.
    const SAMPLE_IDENTIFIER: &str = "alarm";

    /// Parses `bytes` with the payload type of `kind`, re-serialised on success. The match is
    /// exhaustive on purpose: a new `TopicKind` does not compile until it has a payload type here.
    fn parse_as(kind: TopicKind, bytes: &[u8]) -> Result<Vec<u8>, PayloadError> {
        match kind {
            TopicKind::Inform => InformRequest::parse(bytes).map(|p| p.to_vec()),
            TopicKind::Progress => ProgressRequest::parse(bytes).map(|p| p.to_vec()),
            TopicKind::Upgrade => UpgradeMessage::parse(bytes).map(|p| p.to_vec()),
            TopicKind::FirmwareGet => FirmwareGetRequest::parse(bytes).map(|p| p.to_vec()),
            TopicKind::FirmwareGetReply => FirmwareGetReply::parse(bytes).map(|p| p.to_vec()),
            TopicKind::PropertyPost => PropertyPostRequest::parse(bytes).map(|p| p.to_vec()),
            TopicKind::PropertyPostReply | TopicKind::EventPostReply => {
                Reply::parse(bytes).map(|p| p.to_vec())
            }
            TopicKind::EventPost => EventPostRequest::parse(bytes).and_then(|p| {
                p.check_identifier(SAMPLE_IDENTIFIER)?;
                Ok(p.to_vec())
            }),
        }
    }

    /// The payload type name `parse_as` uses, to keep the catalog's `payload` honest.
    fn payload_type(kind: TopicKind) -> &'static str {
        match kind {
            TopicKind::Inform => "InformRequest",
            TopicKind::Progress => "ProgressRequest",
            TopicKind::Upgrade => "UpgradeMessage",
            TopicKind::FirmwareGet => "FirmwareGetRequest",
            TopicKind::FirmwareGetReply => "FirmwareGetReply",
            TopicKind::PropertyPost => "PropertyPostRequest",
            TopicKind::PropertyPostReply | TopicKind::EventPostReply => "Reply",
            TopicKind::EventPost => "EventPostRequest",
        }
    }

    #[test]
    fn embedded_catalog_is_valid_and_complete() {
        let c = catalog();
        assert_eq!(c.topics().len(), TopicKind::ALL.len());
        for &kind in TopicKind::ALL {
            let spec = c.get(kind);
            assert_eq!(spec.name, kind);
            assert_eq!(spec.template, kind.template());
            assert_eq!(spec.direction, kind.direction());
            assert!(spec.qos <= 1);
            assert_eq!(spec.payload, payload_type(kind), "{kind}");
            assert!(!spec.description.is_empty(), "{kind}");
        }
        // The QoS choices documented in the catalog header.
        assert_eq!(c.qos(TopicKind::Inform), 1);
        assert_eq!(c.qos(TopicKind::Progress), 1);
        assert_eq!(c.qos(TopicKind::Upgrade), 1);
    }

    #[test]
    fn templates_round_trip_through_topic_parse() {
        for spec in catalog().topics() {
            let name = spec
                .template
                .replace("{pk}", SAMPLE_PK)
                .replace("{dn}", SAMPLE_DN)
                .replace("{identifier}", SAMPLE_IDENTIFIER);
            let topic = Topic::parse(&name).unwrap_or_else(|| panic!("{name} does not parse"));
            assert_eq!(topic.kind(), spec.name);
            assert_eq!(topic.product_key(), SAMPLE_PK);
            assert_eq!(topic.device_name(), SAMPLE_DN);
            assert_eq!(topic.to_string(), name);
            let built = Topic::from_kind(
                spec.name,
                SAMPLE_PK,
                SAMPLE_DN,
                spec.name.has_identifier().then_some(SAMPLE_IDENTIFIER),
            );
            assert_eq!(built.as_ref(), Some(&topic));
        }
    }

    #[test]
    fn examples_parse_and_invalid_examples_fail() {
        for spec in catalog().topics() {
            for ex in &spec.examples {
                let out = parse_as(spec.name, ex.as_bytes())
                    .unwrap_or_else(|e| panic!("{} example {ex} should parse: {e}", spec.name));
                // What we send parses back to the same bytes.
                let again = parse_as(spec.name, &out).unwrap_or_else(|e| {
                    panic!(
                        "{} re-serialised example {} fails: {e}",
                        spec.name,
                        String::from_utf8_lossy(&out)
                    )
                });
                assert_eq!(again, out, "{}", spec.name);
            }
            for ex in &spec.invalid_examples {
                assert!(
                    parse_as(spec.name, ex.as_bytes()).is_err(),
                    "{} invalid example {ex} was accepted",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn readme_lists_every_template() {
        let readme = include_str!("../README.md");
        for spec in catalog().topics() {
            assert!(
                readme.contains(&format!("`{}`", spec.template)),
                "README.md lacks {}",
                spec.template
            );
        }
    }

    #[test]
    fn broken_catalogs_are_refused() {
        let one = |name: &str, template: &str, dir: &str, qos: u8| {
            format!(
                "[[topic]]\nname = \"{name}\"\ntemplate = \"{template}\"\ndirection = \"{dir}\"\nqos = {qos}\n\
                 payload = \"X\"\ndescription = \"d\"\nexamples = ['{{}}']\n"
            )
        };
        let full: String = TopicKind::ALL
            .iter()
            .map(|k| one(k.as_str(), k.template(), k.direction().as_str(), 0))
            .collect();
        assert!(Catalog::parse(&full).is_ok());
        let missing: String = TopicKind::ALL[1..]
            .iter()
            .map(|k| one(k.as_str(), k.template(), k.direction().as_str(), 0))
            .collect();
        assert!(matches!(
            Catalog::parse(&missing),
            Err(CatalogError::Missing(TopicKind::Inform))
        ));
        let dup = format!(
            "{full}{}",
            one("inform", "/ota/device/inform/{pk}/{dn}", "up", 1)
        );
        assert!(matches!(
            Catalog::parse(&dup),
            Err(CatalogError::Duplicate(TopicKind::Inform))
        ));
        let bad_qos = full.replacen("qos = 0", "qos = 2", 1);
        assert!(matches!(
            Catalog::parse(&bad_qos),
            Err(CatalogError::Qos(_))
        ));
        let bad_dir = full.replacen("direction = \"up\"", "direction = \"down\"", 1);
        assert!(matches!(
            Catalog::parse(&bad_dir),
            Err(CatalogError::Direction(_))
        ));
        let bad_tpl = full.replacen("/ota/device/inform/{pk}/{dn}", "/ota/inform/{pk}/{dn}", 1);
        assert!(matches!(
            Catalog::parse(&bad_tpl),
            Err(CatalogError::Template { .. })
        ));
        let unknown = full.replacen("name = \"inform\"", "name = \"reboot\"", 1);
        assert!(matches!(
            Catalog::parse(&unknown),
            Err(CatalogError::Toml(_))
        ));
    }
}
