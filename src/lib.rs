//! keyswap: an Envoy ext_proc sidecar that swaps an AI agent's placeholder credential for the
//! real provider key, so the agent never holds one.
//!
//! Where things are:
//! - [`extproc`]: the gRPC service Envoy calls, one small state machine per request.
//! - [`inject`]: the security contract — strip every agent credential, write the real one.
//! - [`config`]: manifests → validated, immutable [`config::Snapshot`], swapped atomically.
//! - [`provider`]: the provider registry (hosts, credential headers, endpoints).
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod certs;
pub mod cli;
pub mod config;
pub mod envoy;
pub mod extproc;
pub mod glob;
pub mod http;
pub mod inject;
pub mod provider;
pub mod scrub;
pub mod target;
pub mod telemetry;
