//! Integration tests: the whole gateway in-process on ephemeral ports, driven as a device
//! (rumqttc, the vendor's Python SDK) and as an operator (HTTP).

mod device_auth;
mod export;
mod firmware;
mod forwarding;
mod helpers;
mod interop;
mod isolation;
mod migration;
mod operator_api;
mod ota;
mod registry_flow;
