//! Fixtures shared by the unit tests and the in-process benchmarks (`benches/`): the OTA engine
//! on a manual clock ([`ota`]). The forwarder's, which need the test RabbitMQ, are in
//! [`crate::forwarder::testing`]. Compiled for the unit tests and with the `testing` feature
//! (which the benchmarks turn on); never part of a gateway build.

pub mod ota;
