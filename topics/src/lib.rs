//! The Alibaba IoT Link protocol as fleetgate speaks it: topic templates, typed payloads, the
//! topic catalog, and CONNECT signatures. Shared by the gateway and `firmware-sim` so the two can
//! never disagree.
//!
//! # Layout
//!
//! - [`topic`]: [`Topic`] (parse/format topic names without allocating), [`TopicKind`] (stable
//!   metric labels), [`Direction`].
//! - [`payload`]: the JSON payload of every topic ([`InformRequest`], [`ProgressRequest`],
//!   [`UpgradeMessage`], [`FirmwareGetRequest`]/[`FirmwareGetReply`], [`PropertyPostRequest`],
//!   [`EventPostRequest`], [`Reply`]), one [`PayloadError`], and the reply [`codes`].
//! - [`catalog`]: `catalog.toml` (direction, QoS, description, example payloads per topic), the
//!   single source the docs (`README.md`) and tests are checked against.
//! - [`downlink`]: the cloud-to-device commands (property set, service calls, RRPC): their
//!   topics, the device's answer topics ([`downlink::DeviceAnswer`]) and the request payload.
//! - [`sign`]: Link CONNECT client ids, usernames and password signatures.
//!
//! # Example: what the gateway's ingest does with one publish
//!
//! ```
//! use fleetgate_topics::{catalog, loose_id, PropertyPostRequest, Reply, Topic, TopicKind};
//!
//! let topic = Topic::parse("/sys/a1pk/dev1/thing/event/property/post").expect("a known topic");
//! assert_eq!((topic.kind(), topic.product_key(), topic.device_name()), (TopicKind::PropertyPost, "a1pk", "dev1"));
//! assert_eq!(topic.kind().as_str(), "property_post"); // metric label
//!
//! let payload = br#"{"id":"7","params":{"Temp":21.5}}"#;
//! let reply = match PropertyPostRequest::parse(payload) {
//!     Ok(post) => {
//!         let items = post.items(1_700_000_000_000); // receive time fills in missing `time`s
//!         assert_eq!(items["Temp"].time, 1_700_000_000_000);
//!         Reply::success(post.id.as_str())
//!     }
//!     Err(e) => Reply::from_error(loose_id(payload), &e),
//! };
//! let reply_topic = topic.reply_topic().expect("property posts are replied");
//! assert_eq!(reply_topic.to_string(), "/sys/a1pk/dev1/thing/event/property/post_reply");
//! assert_eq!(catalog().qos(reply_topic.kind()), 0);
//! assert_eq!(reply.to_vec(), br#"{"code":200,"data":{},"id":"7","message":"success","version":"1.0"}"#);
//! ```

pub mod catalog;
pub mod downlink;
pub mod payload;
pub mod sign;
pub mod topic;

pub use catalog::{catalog, Catalog, TopicSpec};
pub use payload::{
    codes, loose_id, AlinkSys, EventParams, EventPostRequest, FailureCode, FirmwareGetParams,
    FirmwareGetReply, FirmwareGetRequest, FirmwareSignMethod, InformParams, InformRequest, Item,
    MessageId, PayloadError, ProgressParams, ProgressRequest, ProgressStep, PropertyPostRequest,
    PropertyValue, Reply, UpgradeData, UpgradeMessage, DEFAULT_MODULE,
};
pub use topic::{Direction, Topic, TopicError, TopicKind};
