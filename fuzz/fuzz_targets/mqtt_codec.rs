//! The MQTT 3.1.1 codec over a stream of client packets (decode, re-encode, decode).
//! The harness and its invariants: `fleetgate::fuzzing::mqtt_codec`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fleetgate::fuzzing::mqtt_codec(data));
