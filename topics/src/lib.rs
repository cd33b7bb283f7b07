//! The Alibaba IoT Link protocol as fleetgate speaks it: topic templates, typed payloads, the
//! topic catalog, and CONNECT signatures. Shared by the gateway and `firmware-sim` so the two can
//! never disagree.

pub mod sign;
