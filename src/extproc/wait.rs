//! Request headers that wait before they are decided: for a GCP access token (the first
//! request, or after expiry) or a JWKS refetch (a JWT naming a key not held yet). The stream
//! parks the headers, polls the fetch, and decides again once it completes.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use tonic::Status;

use super::{on_request_headers, Handled, ProcessStream, Step};
use crate::auth::Peer;
use crate::budget::Places;
use crate::config::Snapshot;
use crate::inject::gcp::{Token, TokenSource};

/// What the request headers wait for.
pub enum Wait {
    /// With the places the request holds while it waits.
    Token(Arc<TokenSource>, Places),
    Keys(Arc<crate::auth::jwt::Jwks>),
}

/// How a request-headers decision is being made: the first time, or again after a wait.
pub enum Resume<'a> {
    First,
    /// After a GCP token fetch, with its outcome, and the places the request held while it
    /// waited: the decision keeps them rather than asking again (a request of the same key
    /// arriving meanwhile cannot take a place this one waited in). No outcome: the configuration
    /// changed while the request waited, so the route's token is asked of the new snapshot's
    /// source (the one fetched may be another key's).
    Token(Option<Result<&'a Token, &'a str>>, Places),
    /// After a refetch of this JWKS source.
    Keys(Arc<crate::auth::jwt::Jwks>),
}

/// Request headers parked until what they wait for arrives.
pub(super) struct Waiting {
    wait: WaitFor,
    /// The places the request took among its budget keys' requests in flight before it parked:
    /// a slow token fetch cannot gather more parked requests of one key than its limit.
    held: Places,
    snapshot: Arc<Snapshot>,
    headers: Vec<HeaderValue>,
    has_body: bool,
    peer: Peer,
    started: Instant,
}

enum WaitFor {
    Token(crate::inject::gcp::TokenFuture),
    Keys(futures_util::future::Shared<futures_util::future::BoxFuture<'static, ()>>, Arc<crate::auth::jwt::Jwks>),
}

impl WaitFor {
    fn of(step_wait: Wait) -> (WaitFor, Places) {
        match step_wait {
            Wait::Token(source, held) => (WaitFor::Token(Box::pin(async move { source.token().await })), held),
            Wait::Keys(jwks) => (WaitFor::Keys(jwks.refresh(), jwks), Places::default()),
        }
    }
}

impl Waiting {
    pub(super) fn new(
        wait: Wait,
        snapshot: Arc<Snapshot>,
        headers: Vec<HeaderValue>,
        has_body: bool,
        peer: Peer,
        started: Instant,
    ) -> Waiting {
        let (wait, held) = WaitFor::of(wait);
        Waiting { wait, held, snapshot, headers, has_body, peer, started }
    }
}

impl ProcessStream {
    /// The parked request headers: pending until the fetch completes, then decided again.
    pub(super) fn poll_waiting(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<ProcessingResponse, Status>>> {
        let Some(w) = self.waiting.as_mut() else { return Poll::Pending };
        let (token, refetched) = match &mut w.wait {
            WaitFor::Token(f) => {
                let Poll::Ready(token) = f.as_mut().poll(cx) else { return Poll::Pending };
                (Some(token), None)
            }
            WaitFor::Keys(f, jwks) => {
                let Poll::Ready(()) = Pin::new(f).poll(cx) else { return Poll::Pending };
                (None, Some(jwks.clone()))
            }
        };
        let mut w = self.waiting.take().expect("waiting");
        let held = std::mem::take(&mut w.held);
        let this = &mut *self;
        // Decided on the configuration in effect now, not the one the request parked on: an
        // agent token revoked, a route removed or a key rotated while it waited counts.
        let current = this.shared.store.load_full();
        let changed = !Arc::ptr_eq(&current, &w.snapshot);
        w.snapshot = current;
        let resume = match (&token, refetched) {
            (Some(t), _) => Resume::Token((!changed).then(|| t.as_ref().map(|t| &**t).map_err(|e| &**e)), held),
            (None, Some(jwks)) => Resume::Keys(jwks),
            (None, None) => Resume::First,
        };
        let outcome = match on_request_headers(&w.snapshot, &this.shared, &w.headers, w.has_body, resume, &w.peer) {
            Step::Answer(outcome) => outcome,
            // A JWKS refetch, then a token fetch: wait again.
            Step::Wait(next) => {
                let (wait, held) = WaitFor::of(next);
                this.waiting = Some(Box::new(Waiting { wait, held, ..*w }));
                return self.poll_next_again(cx);
            }
        };
        let (resp, end) = this.accept(outcome, w.snapshot);
        match this.after_headers(resp, end, w.has_body, w.started) {
            Handled::Answer(resp, phase, end) => {
                this.shared.metrics.observe(phase, w.started.elapsed());
                if end {
                    this.end_span();
                }
                Poll::Ready(Some(Ok(resp)))
            }
            _ => self.poll_next_again(cx),
        }
    }

    fn poll_next_again(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<ProcessingResponse, Status>>> {
        tokio_stream::Stream::poll_next(self, cx)
    }
}
