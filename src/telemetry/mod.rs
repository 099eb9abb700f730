//! Counters the request path bumps without locks. Exported on `/metrics` by the admin server.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    /// ext_proc streams that reached the request-headers phase.
    pub requests: AtomicU64,
    pub injections: AtomicU64,
    /// 403: no route on a deny-all gateway.
    pub denied_no_route: AtomicU64,
    /// 503: matched route, credential missing.
    pub denied_credential_unavailable: AtomicU64,
    /// Requests passed through untouched (allow-all or allow-list).
    pub passed_through: AtomicU64,
    /// Requests where the agent sent a credential of its own (stripped either way).
    pub smuggle_attempts: AtomicU64,
    /// Streams ended with an error status because a message broke the protocol.
    pub protocol_errors: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
