//! End-to-end tests: real `edgebus` processes on free ports, driven by mosquitto's clients,
//! rumqttc and hand-made packets. One test binary keeps link time down.

mod broker;
mod cluster;
mod conformance;
mod durable_sessions;
mod faults;
mod first_hour;
mod hardening;
mod harness;
mod health;
mod ops;
mod persistence;
mod presence;
mod readme;
mod runtime;
mod saga;
mod security;
mod tokens;
