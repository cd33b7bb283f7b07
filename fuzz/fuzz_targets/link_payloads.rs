//! The Link protocol's parsers of device input, through `fleetgate-topics`' public API: topic
//! names and the JSON payload of every topic (what ingest runs on each upstream PUBLISH).
//!
//! Invariants: a parsed payload re-serialises (`to_vec`) to JSON that parses to an equal value;
//! a refused payload gets an error reply that parses back; `loose_id` stays within the id
//! length limit; a parsed topic formats to exactly its name, and its reply topic parses to the
//! reply kind.
#![no_main]

use fleetgate_topics::payload::MAX_ID_LEN;
use fleetgate_topics::{
    loose_id, EventPostRequest, FirmwareGetReply, FirmwareGetRequest, InformRequest,
    ProgressRequest, PropertyPostRequest, Reply, Topic, UpgradeMessage,
};
use libfuzzer_sys::fuzz_target;

macro_rules! round_trip {
    ($ty:ty, $data:expr) => {
        match <$ty>::parse($data) {
            Ok(parsed) => {
                let bytes = parsed.to_vec();
                let again = <$ty>::parse(&bytes).unwrap_or_else(|e| {
                    panic!(
                        "{} re-serialised to {:?}, which does not parse: {e}",
                        stringify!($ty),
                        String::from_utf8_lossy(&bytes)
                    )
                });
                assert_eq!(again, parsed, "{} round trip", stringify!($ty));
            }
            Err(e) => {
                let reply = Reply::from_error(loose_id($data), &e);
                let again = Reply::parse(&reply.to_vec()).expect("an error reply parses");
                assert_eq!(again, reply);
            }
        }
    };
}

fuzz_target!(|data: &[u8]| {
    round_trip!(InformRequest, data);
    round_trip!(ProgressRequest, data);
    round_trip!(UpgradeMessage, data);
    round_trip!(FirmwareGetRequest, data);
    round_trip!(FirmwareGetReply, data);
    round_trip!(PropertyPostRequest, data);
    round_trip!(EventPostRequest, data);
    round_trip!(Reply, data);
    assert!(loose_id(data).len() <= MAX_ID_LEN);

    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(topic) = Topic::parse(name) {
        assert_eq!(topic.to_string(), name);
        if let Some(reply) = topic.reply_topic() {
            let reply_name = reply.to_string();
            let parsed = Topic::parse(&reply_name).expect("a reply topic parses");
            assert_eq!(Some(parsed.kind()), topic.kind().reply_kind());
        }
    }
});
