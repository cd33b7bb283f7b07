//! The API's CSV/JSON device-list readers (batch create, OTA device list, migration canary).
//! The harness and its invariants: `fleetgate::fuzzing::csv_batch`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fleetgate::fuzzing::csv_batch(data));
