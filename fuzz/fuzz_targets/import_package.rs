//! An uploaded import package through the package reader.
//! The harness and its invariants: `fleetgate::fuzzing::import_package`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fleetgate::fuzzing::import_package(data));
