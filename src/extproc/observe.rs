//! Telemetry off the path the agent waits on: response bodies that only spans and budget
//! settlement read come from Envoy's second ext_proc filter, in observability mode (Envoy sends
//! each chunk and goes on; keyswap never answers).
//!
//! ```text
//! decode: observe (skips) → keyswap (decides, waits) → router
//! encode: keyswap (response headers: scrub, span; waits) → observe (body chunks: send and go)
//! ```
//!
//! The deciding stream answers the response headers, then parks its transaction and budget
//! reservation here under a number it writes into the request's dynamic metadata (namespace
//! [`METADATA_NAMESPACE`], which only keyswap's filter may write and the agent cannot reach).
//! The observing filter forwards that metadata with every message; its stream claims the parked
//! state with the response headers and finishes the span and settles the budget when the body ends
//! (or the stream does: a response cut off). Envoy passes the response to the observing filter
//! only after the deciding filter answered its headers, so the state is always parked before it is
//! claimed.
//!
//! The deciding stream hands off only when Envoy says the observing filter runs on the request's
//! route (gRPC metadata [`OBSERVED_METADATA`], set per virtual host by the generated config);
//! otherwise it reads the body itself, as before. A stale Envoy configuration is therefore slower,
//! never wrong.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use super::budget::Budgeted;
use super::{Shared, Traced};
use crate::telemetry::Metrics;

pub use crate::vocab::{METADATA_NAMESPACE, OBSERVED_METADATA};

/// The field of [`METADATA_NAMESPACE`] that names the parked state.
const TX_FIELD: &str = "tx";

/// Parked state no observing stream claimed within this long is finished as cut off. The
/// observing stream claims it with the response headers, right after keyswap answered them, so
/// only a response Envoy never passed on to the observing filter (an Envoy configuration that
/// promises the filter but lacks it) waits this long; longer than any response may take (the
/// generated routes time out after 600 s).
pub const UNCLAIMED_TTL: Duration = Duration::from_secs(610);

/// How often unclaimed state is looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

const SHARDS: usize = 8;

/// What the deciding stream leaves for the observing one.
pub(super) struct Parked {
    pub(super) tx: Option<Traced>,
    pub(super) budget: Option<Box<Budgeted>>,
    at: Instant,
    /// What it holds on the heap, about (counted against [`MAX_PARKED_BYTES`]).
    bytes: usize,
}

impl Parked {
    /// Ends what is parked: the span exported; a reservation the last chunk did not settle is
    /// settled as cut off (dropping it does). `ended`: the body ended (counted as such).
    fn finish(self, shared: &Shared, ended: bool) {
        let m = &shared.metrics;
        Metrics::inc(if ended { &m.observed_ended } else { &m.observed_cut_off });
        self.end(shared);
    }

    fn end(self, shared: &Shared) {
        let Parked { tx, mut budget, .. } = self;
        if let Some(t) = tx {
            t.finish(&shared.sink, budget.as_deref_mut());
        }
        drop(budget);
    }

    /// Ends what no observing stream claimed: its response went on unseen (the observing filter
    /// fails open: a stream Envoy could not open to keyswap lets the whole body through), so a
    /// reservation is settled keeping what it reserved, not as a cut with nothing passed.
    fn end_unseen(mut self, shared: &Shared) {
        if let Some(b) = self.budget.as_mut() {
            b.settle_unseen();
        }
        self.end(shared);
    }
}

/// Parked transactions by number. A short critical section per hand-off and per claim, spread
/// over a few shards: the only lock on the response path, and only on requests that hand off.
pub struct Handoffs {
    next: AtomicU64,
    shards: [Mutex<HashMap<u64, Parked>>; SHARDS],
    /// How many are parked (what [`Handoffs::park`] checks against [`MAX_PARKED`]).
    parked: std::sync::atomic::AtomicUsize,
    /// … and what they hold, about ([`MAX_PARKED_BYTES`]).
    parked_bytes: std::sync::atomic::AtomicUsize,
}

/// At most this many transactions wait for an observing stream. Past it a response body is read
/// on the deciding stream instead: state no observing stream claims (an agent that resets right
/// after its response headers, again and again) waits [`UNCLAIMED_TTL`], and must not pile up.
pub const MAX_PARKED: usize = 16_384;
/// … and at most this much of what they hold (spans with captured bodies run to hundreds of KB
/// each: the count alone would let them take gigabytes). The span queue's bound.
pub const MAX_PARKED_BYTES: usize = 64 << 20;

impl Default for Handoffs {
    fn default() -> Self {
        Handoffs {
            next: AtomicU64::new(1),
            shards: std::array::from_fn(|_| Mutex::default()),
            parked: std::sync::atomic::AtomicUsize::new(0),
            parked_bytes: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// What [`Handoffs::park`] gives back when it is full.
pub(super) type Unparked = (Option<Traced>, Option<Box<Budgeted>>);

impl Handoffs {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Parked>> {
        // A poisoned shard only means a panic elsewhere while it was held: the map is still whole.
        self.shards[(id as usize) % SHARDS].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks `tx` and `budget`; returns the number the observing stream claims them by, or
    /// gives them back when [`MAX_PARKED`] are waiting already, or [`MAX_PARKED_BYTES`].
    pub(super) fn park(&self, tx: Option<Traced>, budget: Option<Box<Budgeted>>) -> Result<u64, Unparked> {
        let bytes = tx.as_ref().map_or(0, |t| t.tx.heap_bytes()) + budget.as_ref().map_or(0, |_| 1024);
        self.park_sized(tx, budget, bytes)
    }

    fn park_sized(&self, tx: Option<Traced>, budget: Option<Box<Budgeted>>, bytes: usize) -> Result<u64, Unparked> {
        let held = self.parked_bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.parked.fetch_add(1, Ordering::Relaxed) >= MAX_PARKED || held + bytes > MAX_PARKED_BYTES {
            self.parked.fetch_sub(1, Ordering::Relaxed);
            self.parked_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err((tx, budget));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(id).insert(id, Parked { tx, budget, at: Instant::now(), bytes });
        Ok(id)
    }

    /// Counts `p` out of what is parked.
    fn unpark(&self, p: &Parked) {
        self.parked.fetch_sub(1, Ordering::Relaxed);
        self.parked_bytes.fetch_sub(p.bytes, Ordering::Relaxed);
    }

    fn claim(&self, id: u64) -> Option<Parked> {
        let claimed = self.shard(id).remove(&id);
        if let Some(p) = &claimed {
            self.unpark(p);
        }
        claimed
    }

    /// How many are parked.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map(|m| m.len()).unwrap_or(0)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes out what was parked before `now - ttl`.
    fn expired(&self, now: Instant, ttl: Duration) -> Vec<Parked> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            let old: Vec<u64> =
                map.iter().filter(|(_, p)| now.saturating_duration_since(p.at) >= ttl).map(|(k, _)| *k).collect();
            out.extend(old.into_iter().filter_map(|k| map.remove(&k)));
        }
        out.iter().for_each(|p| self.unpark(p));
        out
    }
}

/// Finishes state no observing stream claimed in time, every [`SWEEP_EVERY`], until `shared` is
/// gone.
pub fn spawn_sweeper(shared: &Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { return };
            sweep(&shared, Instant::now(), UNCLAIMED_TTL);
        }
    })
}

/// Finishes (unseen: [`Parked::end_unseen`]) what was parked longer than `ttl`; returns how many.
pub fn sweep(shared: &Shared, now: Instant, ttl: Duration) -> usize {
    let expired = shared.handoffs.expired(now, ttl);
    let n = expired.len();
    if n > 0 {
        Metrics::add(&shared.metrics.observed_never_arrived, n as u64);
        tracing::warn!(
            count = n,
            "response bodies never reached keyswap's observing filter; spans ended and reservations kept as reserved \
             (the agent hung up before the body, Envoy could not open the observing stream, or Envoy's configuration \
             is not the one keyswap generates)"
        );
    }
    for p in expired {
        p.end_unseen(shared);
    }
    n
}

/// The dynamic metadata that names parked state `id` (set with the response headers' answer).
pub(super) fn metadata(id: u64) -> Struct {
    let inner = Struct {
        fields: [(TX_FIELD.to_owned(), Value { kind: Some(Kind::StringValue(id.to_string())) })].into_iter().collect(),
    };
    Struct {
        fields: [(METADATA_NAMESPACE.to_owned(), Value { kind: Some(Kind::StructValue(inner)) })].into_iter().collect(),
    }
}

/// The parked state a message names, if any.
fn named(msg: &ProcessingRequest) -> Option<u64> {
    let ns = msg.metadata_context.as_ref()?.filter_metadata.get(METADATA_NAMESPACE)?;
    match ns.fields.get(TX_FIELD)?.kind.as_ref()? {
        Kind::StringValue(s) => s.parse().ok(),
        _ => None,
    }
}

/// One observing stream: the response body chunks of one request. Never answers.
pub struct ObserveStream {
    inner: Streaming<ProcessingRequest>,
    shared: Arc<Shared>,
    claimed: Option<Parked>,
    /// The first message was looked at (claimed or not).
    looked: bool,
}

impl ObserveStream {
    pub(super) fn new(inner: Streaming<ProcessingRequest>, shared: Arc<Shared>) -> Self {
        ObserveStream { inner, shared, claimed: None, looked: false }
    }

    /// One message; `true` when the stream has nothing more to observe.
    fn on_message(&mut self, msg: ProcessingRequest) -> bool {
        if !self.looked {
            self.looked = true;
            self.claimed = named(&msg).and_then(|id| self.shared.handoffs.claim(id));
            if self.claimed.is_none() {
                // A route the observing filter runs on whose request needed no body (tracing off,
                // no token budget), or a number keyswap never handed out.
                tracing::trace!("observing stream without parked state; ignored");
            }
        }
        let Some(p) = self.claimed.as_mut() else { return true };
        match msg.request {
            Some(Request::ResponseBody(b)) => {
                if let Some(t) = &mut p.tx {
                    t.tx.on_response_body(&b.body);
                }
                if let Some(budget) = &mut p.budget {
                    budget.response_body(&b.body, b.end_of_stream);
                }
                if b.end_of_stream {
                    let p = self.claimed.take().expect("claimed");
                    p.finish(&self.shared, true);
                    return true;
                }
                false
            }
            // Response headers open the stream (the deciding stream recorded them); nothing else
            // is configured, and nothing else changes anything.
            _ => false,
        }
    }
}

impl Drop for ObserveStream {
    /// The stream ended before the body did (the agent hung up, the upstream reset): cut off.
    fn drop(&mut self) {
        if let Some(p) = self.claimed.take() {
            p.finish(&self.shared, false);
        }
        self.shared.streams.leave();
    }
}

impl Stream for ObserveStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(msg))) => {
                    if self.on_message(msg) {
                        // Ending the stream here frees it at once (Envoy would hold it open for its
                        // deferred-close timeout).
                        return Poll::Ready(None);
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    if status.code() == tonic::Code::Internal {
                        Metrics::inc(&self.shared.metrics.protocol_errors);
                        tracing::warn!(error = status.message(), "undecodable message on an observing stream; ended");
                    }
                    if let Some(p) = self.claimed.take() {
                        p.finish(&self.shared, false);
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(None) => {
                    if let Some(p) = self.claimed.take() {
                        p.finish(&self.shared, false);
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_the_forwarded_context() {
        use envoy_types::pb::envoy::config::core::v3::Metadata;
        let m = metadata(42);
        let Some(Kind::StructValue(ns)) = m.fields[METADATA_NAMESPACE].kind.clone() else { panic!("namespace") };
        let msg = ProcessingRequest {
            metadata_context: Some(Metadata {
                filter_metadata: [(METADATA_NAMESPACE.to_owned(), ns)].into_iter().collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(named(&msg), Some(42));
        assert_eq!(named(&ProcessingRequest::default()), None);
    }

    fn park(h: &Handoffs) -> u64 {
        h.park(None, None).unwrap_or_else(|_| panic!("no room to park"))
    }

    /// The same with captured bodies: 16,384 spans of hundreds of KB each would be gigabytes.
    /// Past [`MAX_PARKED_BYTES`] nothing more is parked, and a claim gives its bytes back.
    #[test]
    fn parked_state_is_bounded_by_what_it_holds_too() {
        let h = Handoffs::default();
        let span = 200 << 10;
        let ids: Vec<u64> = (0..MAX_PARKED_BYTES / span)
            .map(|_| h.park_sized(None, None, span).unwrap_or_else(|_| panic!("no room")))
            .collect();
        assert!(ids.len() < MAX_PARKED, "the count would have bounded it first");
        assert!(h.park_sized(None, None, span).is_err(), "parked past the bytes bound");
        assert!(h.park_sized(None, None, 1).is_ok(), "small state still fits");
        assert!(h.claim(ids[0]).is_some());
        assert!(h.park_sized(None, None, span).is_ok(), "a claim gave its bytes back");
        assert!(h.park_sized(None, None, span).is_err());
        h.expired(Instant::now() + UNCLAIMED_TTL, UNCLAIMED_TTL);
        assert!(h.park_sized(None, None, span).is_ok(), "expiry gave the bytes back");
    }

    /// The attack: an agent that resets each request right after its response headers leaves
    /// state no observing stream claims, for [`UNCLAIMED_TTL`] each. Past [`MAX_PARKED`] nothing
    /// more is parked (the caller reads that body on its own stream), and claims and expiry make
    /// room again.
    #[test]
    fn parked_state_is_bounded_and_claims_and_expiry_make_room() {
        let h = Handoffs::default();
        let ids: Vec<u64> = (0..MAX_PARKED).map(|_| park(&h)).collect();
        assert!(h.park(None, None).is_err(), "parked past the bound");
        assert!(h.claim(ids[0]).is_some());
        assert!(h.park(None, None).is_ok(), "a claim made room");
        assert!(h.park(None, None).is_err());
        assert_eq!(h.expired(Instant::now() + UNCLAIMED_TTL, UNCLAIMED_TTL).len(), MAX_PARKED);
        assert!(h.park(None, None).is_ok(), "expiry made room");
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn parked_state_is_claimed_once_and_expires_when_unclaimed() {
        let h = Handoffs::default();
        let a = park(&h);
        let b = park(&h);
        assert_ne!(a, b);
        assert_eq!(h.len(), 2);
        assert!(h.claim(a).is_some());
        assert!(h.claim(a).is_none(), "a second stream naming the same number gets nothing");
        assert!(h.expired(Instant::now(), Duration::from_secs(60)).is_empty());
        assert_eq!(h.expired(Instant::now() + Duration::from_secs(61), Duration::from_secs(60)).len(), 1);
        assert!(h.is_empty());
        assert!(h.claim(b).is_none());
    }
}
