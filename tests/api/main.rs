//! Integration tests: the whole gateway in-process on ephemeral ports, driven as a device
//! (rumqttc, the vendor's Python SDK) and as an operator (HTTP).

/// The allocator the `fleetgate` binary ships with (see `src/main.rs`), so the in-process
/// gateway and the benchmarks here behave like the binary.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod admission;
mod commands;
mod console;
mod device_auth;
mod export;
mod firmware;
mod forwarding;
mod helpers;
mod instances;
mod interop;
mod isolation;
mod limits;
mod metrics;
mod migration;
mod operations;
mod operator_api;
mod ota;
mod registry_flow;
mod startup;
mod store_postgres;
