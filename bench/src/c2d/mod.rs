//! Cloud-to-device benchmarks (issue 20, docs/COMMANDS.md).
//!
//! - **RRPC** (`--parts rrpc`): synchronous RRPC round trips through the gateway's HTTP API
//!   (`POST …/devices/{dn}/rrpc`) to `--rrpc-devices` connected devices that answer every
//!   request on its response topic, `--rrpc-concurrency` calls in flight, round robin over the
//!   devices. Next to it, in the same run, the same request/response between bare MQTT
//!   clients through stock rumqttd: one requester (QoS 0 requests on
//!   `/sys/{pk}/{dn}/rrpc/request/{id}`, one wildcard subscription to the responses, the same
//!   number of calls in flight) and the same responders. Calls/s, latency, and the CPU time of
//!   the broker process (and of this process: devices and caller) per call.
//! - **Broadcast** (`--parts broadcast`): `--broadcast-devices` connected devices subscribed
//!   to their `/{pk}/{dn}/user/cmd`; the operator API's broadcast (≤ 1,000 device names per
//!   call, so several calls, all in flight at once and sharing the gateway's limiter) at each
//!   `--broadcast-rates` (`[commands] broadcast_per_sec`). Delivered/s measured at the
//!   devices, and the observed rate against the configured one.
//!
//! The devices are rumqttc clients in this process (one descriptor each); the gateway is its
//! own process (one descriptor per device there), so 10,000 devices stay below a 20,000

mod broadcast;
mod rrpc;

pub(crate) use broadcast::{broadcast, BroadcastRow};
pub(crate) use rrpc::{rrpc, RrpcRow};

use crate::Results;

/// The tables of the two parts.
pub(crate) fn print_report(r: &Results) {
    rrpc::print_table(r);
    broadcast::print_table(r);
}
