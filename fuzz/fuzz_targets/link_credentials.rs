//! Link CONNECT credentials (client id, username, password) through the parsers and the broker's authentication.
//! The harness and its invariants: `fleetgate::fuzzing::link_credentials`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fleetgate::fuzzing::link_credentials(data));
