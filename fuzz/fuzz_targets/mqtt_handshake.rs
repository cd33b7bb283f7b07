//! A connection's first bytes through the CONNECT handshake's verdict.
//! The harness and its invariants: `fleetgate::fuzzing::mqtt_handshake`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fleetgate::fuzzing::mqtt_handshake(data));
