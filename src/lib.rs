//! keyswap: an Envoy ext_proc sidecar that swaps an AI agent's placeholder credential for the
//! real provider key, so the agent never holds one.
//!
//! Where things are, in the order a request meets them:
//! - [`extproc`]: the gRPC service Envoy calls, one small state machine per request.
//! - [`auth`]: who is calling (the gateway's agent-token validators).
//! - [`inject`]: the security contract — strip every agent credential, write the real one.
//! - [`config`]: manifests → validated, immutable [`config::Snapshot`], swapped atomically.
//! - [`budget`]: token budgets, reserved before the provider and settled from its usage.
//! - [`provider`]: the provider registry (hosts, credential headers, endpoints, usage formats).
//! - [`telemetry`]: spans, metrics and the admin server.
//! - [`envoy`]: the Envoy configuration keyswap generates (half of the boundary).
//!
//! ## Dependency order
//!
//! Dependencies run one way: a module uses only modules listed before it (above it, or earlier
//! in its own line). `tests/architecture.rs` reads this list and fails on any edge against it.
//!
//! 1. vocabulary: `vocab`, `glob`, `http`, `scrub`, `target`, `prom`, `api`
//! 2. mechanisms: `provider`, `auth`, `inject`, `certs`, `budget`
//! 3. configuration: `config`
//! 4. telemetry: `telemetry`
//! 5. serving: `envoy`, `extproc`
//! 6. command line: `cli`
//!
//! The vocabulary imports nothing of keyswap: object keys, the placeholder, the credential header
//! list, identities ([`vocab`]), and small parsers for hosts, paths and bodies. The mechanisms
//! are the registries and what they do to one request; `config` compiles manifests into a
//! snapshot of them; `telemetry` reads snapshots and requests; the serving paths put it all on
//! the wire.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod budget;
pub mod certs;
pub mod cli;
pub mod config;
pub mod envoy;
pub mod extproc;
pub mod glob;
pub mod http;
pub mod inject;
pub mod prom;
pub mod provider;
pub mod scrub;
pub mod target;
pub mod telemetry;
pub mod vocab;
