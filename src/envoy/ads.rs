//! keyswap's aggregated discovery service (state of the world): Envoy subscribes to clusters,
//! listeners, route configurations and the leaf secret on one stream, and gets each type again
//! whenever [`Ads::publish`] changes it.
//!
//! A type's version is a hash of its resources, so an unchanged type is never resent (a listener
//! update would drain connections) and a keyswap restart serving the same configuration hands
//! Envoy the versions it already has. Types go out in the order Envoy needs them: clusters and
//! the leaf before the listeners and routes that use them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use super::xds;
use crate::telemetry::XdsStats;

/// The order types are (re)sent in: what a resource refers to goes out before it.
const ORDER: [&str; 4] = [xds::CLUSTER, xds::SECRET, xds::LISTENER, xds::ROUTE];

/// One type's resources, by name, and their version.
#[derive(Clone, Default)]
pub struct TypeSet {
    pub version: String,
    resources: Vec<(String, Any)>,
}

impl TypeSet {
    /// Named resources; the version hashes them.
    pub fn new(mut resources: Vec<(String, Any)>) -> TypeSet {
        use sha2::Digest as _;
        resources.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = sha2::Sha256::new();
        for (name, any) in &resources {
            h.update((name.len() as u64).to_be_bytes());
            h.update(name.as_bytes());
            h.update((any.value.len() as u64).to_be_bytes());
            h.update(&any.value);
        }
        let version = h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect();
        TypeSet { version, resources }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.resources.iter().map(|(n, _)| n.as_str())
    }

    /// The resources `wanted` names (all of them when it is empty: a wildcard subscription).
    fn select(&self, wanted: &[String]) -> Vec<Any> {
        self.resources.iter().filter(|(n, _)| wanted.is_empty() || wanted.contains(n)).map(|(_, a)| a.clone()).collect()
    }
}

/// What Envoy gets: each type's resources. Holds the leaf's private key (encoded): no `Debug`.
#[derive(Clone, Default)]
pub struct XdsSnapshot {
    types: HashMap<&'static str, TypeSet>,
}

impl XdsSnapshot {
    pub fn insert(&mut self, type_url: &'static str, set: TypeSet) {
        self.types.insert(type_url, set);
    }

    pub fn get(&self, type_url: &str) -> Option<&TypeSet> {
        self.types.get(type_url)
    }
}

/// The ADS server's state: the current snapshot, watched by every stream.
#[derive(Clone)]
pub struct Ads {
    current: Arc<watch::Sender<Option<Arc<XdsSnapshot>>>>,
    /// Set on shutdown: streams end at once (they never finish on their own, and Envoy keeps its
    /// resources and reconnects to whoever serves the socket next).
    closing: Arc<watch::Sender<bool>>,
    pub stats: Arc<XdsStats>,
}

impl Default for Ads {
    fn default() -> Self {
        Ads {
            current: Arc::new(watch::channel(None).0),
            closing: Arc::new(watch::channel(false).0),
            stats: Arc::default(),
        }
    }
}

impl Ads {
    /// Makes `next` current; streams resend the types whose version changed. Until the first
    /// publish, streams wait (Envoy keeps its last resources, or has none yet).
    pub fn publish(&self, next: XdsSnapshot) {
        self.current.send_replace(Some(Arc::new(next)));
    }

    /// Ends every stream (shutdown), so draining the server does not wait for them.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    pub fn current(&self) -> Option<Arc<XdsSnapshot>> {
        self.current.borrow().clone()
    }

    /// One Envoy's stream: its requests answered, every publish pushed, until either side ends.
    async fn serve(
        self,
        mut inbound: impl tokio_stream::Stream<Item = Result<DiscoveryRequest, Status>> + Unpin,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) {
        let (mut current, mut closing, stats) = (self.current.subscribe(), self.closing.subscribe(), self.stats);
        stats.streams.fetch_add(1, Ordering::Relaxed);
        let mut s = Stream { subs: HashMap::new(), nonce: 0, node: String::new(), tx, stats: stats.clone() };
        loop {
            let open = tokio::select! {
                biased;
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => {
                        // A publish not yet pushed goes out first, every changed type in order:
                        // taking the snapshot here marks it seen, and the request's answer alone
                        // would have left the other types stale until some later publish (a
                        // renewed leaf until the old one expired).
                        // The request is taken in first (a NACK of the response it answers is
                        // logged, the names it asks for kept), then answered after the publish.
                        let published = current.has_changed().unwrap_or(false);
                        let snap = current.borrow_and_update().clone();
                        let asked = s.note(req);
                        (!published || s.on_publish(snap.as_deref()).await)
                            && match asked {
                                Some(t) => s.send(t, snap.as_deref()).await,
                                None => true,
                            }
                    }
                    Some(Err(e)) => {
                        // Undecodable or broken: the stream ends with the error, not with OK.
                        tracing::debug!(node = %s.node, error = %e, "ADS stream failed");
                        let _ = s.tx.send(Err(e)).await;
                        false
                    }
                    None => false,
                },
                changed = current.changed() => {
                    let snap = current.borrow_and_update().clone();
                    changed.is_ok() && s.on_publish(snap.as_deref()).await
                }
                _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => false,
            };
            if !open {
                break;
            }
        }
        stats.streams.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(node = %s.node, "Envoy disconnected from ADS");
    }

    pub fn service(&self) -> AggregatedDiscoveryServiceServer<Ads> {
        AggregatedDiscoveryServiceServer::new(self.clone()).max_decoding_message_size(4 * 1024 * 1024)
    }
}

/// What one stream has sent of one type.
#[derive(Default)]
struct Subscription {
    /// The names Envoy asked for (empty: all).
    names: Vec<String>,
    /// The version last sent and the names it was sent for; `None` until the first response.
    sent: Option<(String, Vec<String>)>,
    nonce: String,
}

/// One Envoy's stream.
struct Stream {
    subs: HashMap<&'static str, Subscription>,
    nonce: u64,
    node: String,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    stats: Arc<XdsStats>,
}

impl Stream {
    /// Takes in a request: the names it asks for, and a NACK logged. Returns the type to answer
    /// ([`Stream::send`] sends it if its version or names changed: an ACK of the latest response
    /// needs nothing); none for a type not served or a request about an older response.
    fn note(&mut self, req: DiscoveryRequest) -> Option<&'static str> {
        if let Some(node) = &req.node {
            if self.node.is_empty() {
                self.node = node.id.clone();
                tracing::info!(node = %self.node, "Envoy connected to ADS");
            }
        }
        let Some(type_url) = ORDER.iter().copied().find(|t| *t == req.type_url) else {
            tracing::debug!(type_url = %req.type_url, node = %self.node, "ADS: unserved type requested");
            return None;
        };
        let sub = self.subs.entry(type_url).or_default();
        if !req.response_nonce.is_empty() && req.response_nonce != sub.nonce {
            return None; // about an older response: superseded
        }
        if let Some(err) = &req.error_detail {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                node = %self.node, type_url, version = %sub.sent.as_ref().map(|s| s.0.as_str()).unwrap_or(""),
                kept = %req.version_info, error = %nack_detail(type_url, &err.message),
                "Envoy rejected the resources keyswap sent; it keeps serving its last good ones"
            );
        }
        sub.names = req.resource_names;
        Some(type_url)
    }

    /// Sends `type_url` when its version, or the names asked for, differ from what was sent.
    async fn send(&mut self, type_url: &'static str, snap: Option<&XdsSnapshot>) -> bool {
        let (Some(set), Some(sub)) = (snap.and_then(|s| s.get(type_url)), self.subs.get_mut(type_url)) else {
            return true;
        };
        if sub.sent.as_ref().is_some_and(|(v, n)| *v == set.version && *n == sub.names) {
            return true;
        }
        self.nonce += 1;
        sub.nonce = self.nonce.to_string();
        sub.sent = Some((set.version.clone(), sub.names.clone()));
        let resp = DiscoveryResponse {
            version_info: set.version.clone(),
            resources: set.select(&sub.names),
            type_url: type_url.to_owned(),
            nonce: sub.nonce.clone(),
            ..Default::default()
        };
        tracing::debug!(node = %self.node, type_url, version = %set.version, count = resp.resources.len(), "ADS push");
        self.stats.pushes.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Ok(resp)).await.is_ok()
    }

    /// After a publish: every subscribed type whose version changed, in [`ORDER`].
    async fn on_publish(&mut self, snap: Option<&XdsSnapshot>) -> bool {
        for t in ORDER {
            if self.subs.contains_key(t) && !self.send(t, snap).await {
                return false;
            }
        }
        true
    }
}

/// What of Envoy's reason for a rejection may be logged. Envoy's validation errors can quote the
/// resource, and the leaf secret's resource is its private key: for secrets, only the length.
fn nack_detail<'a>(type_url: &str, message: &'a str) -> std::borrow::Cow<'a, str> {
    if type_url == xds::SECRET {
        format!("(withheld: a rejected secret's message may quote the key; {} bytes)", message.len()).into()
    } else {
        message.into()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.clone().serve(request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("keyswap serves state-of-the-world ADS (api_type: GRPC)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(version: &str) -> XdsSnapshot {
        let mut x = XdsSnapshot::default();
        for t in [xds::CLUSTER, xds::LISTENER] {
            let any = Any { type_url: t.into(), value: version.as_bytes().to_vec() };
            x.insert(t, TypeSet::new(vec![("r".into(), any)]));
        }
        x
    }

    /// Envoy's acknowledgement of one type arrives with a publish that changed several (a
    /// reload, a renewed leaf): the acknowledgement took the publish as seen and only its own
    /// type went out, the others stale until some later publish (a leaf until it expired).
    #[tokio::test]
    async fn an_acknowledgement_racing_a_publish_still_gets_every_changed_type_pushed() {
        let ads = Ads::default();
        ads.publish(snapshot("v1"));
        let (requests, inbound) = mpsc::unbounded_channel();
        let (tx, mut pushed) = mpsc::channel(16);
        tokio::spawn(ads.clone().serve(tokio_stream::wrappers::UnboundedReceiverStream::new(inbound), tx));
        let ask = |type_url: &str, nonce: &str| {
            Ok(DiscoveryRequest { type_url: type_url.into(), response_nonce: nonce.into(), ..Default::default() })
        };
        let mut next = async || {
            let r = tokio::time::timeout(std::time::Duration::from_secs(2), pushed.recv()).await;
            r.ok().flatten().map(|r: Result<DiscoveryResponse, Status>| r.unwrap())
        };
        requests.send(ask(xds::CLUSTER, "")).unwrap();
        let cluster = next().await.expect("clusters");
        requests.send(ask(xds::LISTENER, "")).unwrap();
        let listener = next().await.expect("listeners");
        // Both at once: the stream's task runs only when this test waits.
        ads.publish(snapshot("v2"));
        requests.send(ask(xds::CLUSTER, &cluster.nonce)).unwrap();
        let (mut types, mut latest) = (Vec::new(), String::new());
        while let Some(r) = next().await {
            assert_ne!(r.version_info, cluster.version_info, "{}", r.type_url);
            if r.type_url == xds::CLUSTER {
                latest = r.nonce.clone();
            }
            types.push(r.type_url);
        }
        assert_eq!(types, [xds::CLUSTER, xds::LISTENER], "every changed type, once, clusters first");
        assert_ne!(listener.version_info, "", "{}", listener.type_url);
        // A rejection of the latest clusters racing the next publish is still counted (and logged).
        let rejected = ads.stats.rejected.load(Ordering::Relaxed);
        ads.publish(snapshot("v3"));
        let mut nack = ask(xds::CLUSTER, &latest).unwrap();
        nack.error_detail = Some(Default::default());
        requests.send(Ok(nack)).unwrap();
        while next().await.is_some() {}
        assert_eq!(ads.stats.rejected.load(Ordering::Relaxed), rejected + 1, "a NACK lost to the publish");
    }

    #[test]
    fn a_rejected_secret_is_never_quoted_in_the_log() {
        let envoy = "Proto constraint validation failed: private_key { inline_string: \"-----BEGIN PRIVATE KEY-----\\nMIGHAgEA\" }";
        let logged = super::nack_detail(super::xds::SECRET, envoy);
        assert!(!logged.contains("MIGHAgEA") && !logged.contains("BEGIN"), "{logged}");
        assert_eq!(super::nack_detail(super::xds::LISTENER, "bad port"), "bad port");
    }
}
