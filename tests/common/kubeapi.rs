//! A fake Kubernetes API server on loopback speaking real HTTP list and watch: resourceVersions,
//! ADDED/MODIFIED/DELETED, BOOKMARK, 410 Gone (`Expired`) after compaction, droppable watch
//! connections, and outages (connections closed unanswered, or 503 answers) after which history
//! is gone, as after an API server restart. No real API server can run on these machines.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches resuming below this get 410 Gone.
    compacted_below: u64,
    objects: BTreeMap<(String, String, String), Value>,
    log: Vec<(u64, String, String, String, &'static str, Value)>,
    down: Option<Outage>,
    /// Answer a stale watch with an HTTP 410 Status instead of a 200 stream holding an ERROR event.
    gone_as_http: bool,
    /// Bumped to cut every open watch.
    generation: u64,
    /// `(resource, namespace)` pairs keyswap's service account may not list or watch: answered
    /// 403 Forbidden, as RBAC answers.
    forbidden: Vec<(String, String)>,
}

/// How the API server is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// Connections are accepted and closed unanswered (an unreachable API server).
    Closed,
    /// Every request is answered `503 Service Unavailable` (a Status).
    Unavailable,
}

#[derive(Clone)]
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
    /// `path?query` of every request, for "never listed all Secrets" checks.
    pub requests: Arc<Mutex<Vec<String>>>,
}

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "egressgateways" => ("keyswap.dev/v1alpha1", "EgressGateway"),
        "aiproviderroutes" => ("keyswap.dev/v1alpha1", "AIProviderRoute"),
        "credentialinjectionpolicies" => ("keyswap.dev/v1alpha1", "CredentialInjectionPolicy"),
        "tokenbudgets" => ("keyswap.dev/v1alpha1", "TokenBudget"),
        _ => ("v1", "Secret"),
    }
}

struct Query {
    resource: String,
    namespace: Option<String>,
    watch: bool,
    /// `labelSelector=k=v` (one equality, what keyswap sends).
    label: Option<(String, String)>,
    rv: Option<u64>,
    name: Option<String>,
    bookmarks: bool,
    timeout: Duration,
}

fn parse(path: &str, query: &str) -> Option<Query> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (namespace, resource) = match parts.as_slice() {
        ["apis", "keyswap.dev", "v1alpha1", "namespaces", ns, r] | ["api", "v1", "namespaces", ns, r] => {
            (Some(ns.to_string()), r.to_string())
        }
        ["apis", "keyswap.dev", "v1alpha1", r] | ["api", "v1", r] => (None, r.to_string()),
        _ => return None,
    };
    let mut q = Query {
        resource,
        namespace,
        watch: false,
        label: None,
        rv: None,
        name: None,
        bookmarks: false,
        timeout: Duration::from_secs(290),
    };
    for (k, v) in super::url_params(query) {
        match k.as_str() {
            "watch" => q.watch = v == "true" || v == "1",
            "resourceVersion" => q.rv = v.parse().ok(),
            "fieldSelector" => q.name = v.strip_prefix("metadata.name=").map(str::to_owned),
            "labelSelector" => q.label = v.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())),
            "allowWatchBookmarks" => q.bookmarks = v == "true",
            "timeoutSeconds" => q.timeout = Duration::from_secs(v.parse().unwrap_or(290)),
            _ => {}
        }
    }
    Some(q)
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeKube {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(State { rv: 100, ..Default::default() })),
            changed: Arc::default(),
            requests: Arc::default(),
        };
        let f = fake.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if f.state.lock().unwrap().down == Some(Outage::Closed) {
                    drop(stream); // unreachable: the connection closes without an answer
                    continue;
                }
                let f = f.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let f = f.clone();
                        async move {
                            if f.state.lock().unwrap().down == Some(Outage::Closed) {
                                // Unreachable: abort the connection instead of answering.
                                return Err(std::io::Error::other("api server down"));
                            }
                            let (parts, body) = hyper::Request::into_parts(req);
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            Ok(f.handle(&parts.method, &parts.uri, &body))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        fake
    }

    /// A kubeconfig pointing at this server (plain HTTP, no auth).
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: agents}}\n\
                 current-context: fake\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }

    fn record(&self, st: &mut State, resource: &str, ns: &str, name: &str, kind: &'static str, mut obj: Value) {
        st.rv += 1;
        let (api_version, k) = kind_of(resource);
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(k);
        obj["metadata"]["name"] = json!(name);
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        obj["metadata"]["uid"] = json!(format!("uid-{resource}-{ns}-{name}"));
        let key = (resource.to_owned(), ns.to_owned(), name.to_owned());
        if kind == "DELETED" {
            st.objects.remove(&key);
        } else {
            st.objects.insert(key, obj.clone());
        }
        let rv = st.rv;
        st.log.push((rv, resource.to_owned(), ns.to_owned(), name.to_owned(), kind, obj));
    }

    /// Creates or replaces an object (ADDED or MODIFIED).
    pub fn put(&self, resource: &str, ns: &str, name: &str, obj: Value) {
        {
            let mut st = self.state.lock().unwrap();
            let exists = st.objects.contains_key(&(resource.to_owned(), ns.to_owned(), name.to_owned()));
            self.record(&mut st, resource, ns, name, if exists { "MODIFIED" } else { "ADDED" }, obj);
        }
        self.changed.notify_waiters();
    }

    pub fn delete(&self, resource: &str, ns: &str, name: &str) {
        {
            let mut st = self.state.lock().unwrap();
            let Some(obj) = st.objects.get(&(resource.to_owned(), ns.to_owned(), name.to_owned())).cloned() else {
                return;
            };
            self.record(&mut st, resource, ns, name, "DELETED", obj);
        }
        self.changed.notify_waiters();
    }

    /// Stale watches get an HTTP 410 answer (as some API server paths do) rather than the usual
    /// ERROR event in a 200 stream.
    pub fn gone_as_http_status(&self) {
        self.state.lock().unwrap().gone_as_http = true;
    }

    /// Cuts every open watch connection.
    pub fn drop_watches(&self) {
        self.state.lock().unwrap().generation += 1;
        self.changed.notify_waiters();
    }

    /// Forgets history: a watch resuming from an older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted_below = st.rv;
    }

    /// While down, connections are closed unanswered (an unreachable API server) and watches end.
    /// Back up, history is gone as after an API server restart (see [`FakeKube::outage`]).
    pub fn set_down(&self, down: bool) {
        self.outage(down.then_some(Outage::Closed));
    }

    /// Starts (`Some`) or ends (`None`) an outage; open watches end either way. When it ends,
    /// the history before it is gone, as after an API server restart: a watch resuming from a
    /// resourceVersion older than now gets 410 Gone (`Expired`) and must relist.
    pub fn outage(&self, outage: Option<Outage>) {
        {
            let mut st = self.state.lock().unwrap();
            if outage.is_none() && st.down.is_some() {
                st.compacted_below = st.rv;
            }
            st.down = outage;
        }
        self.drop_watches();
    }

    /// Forbids (`true`) or allows again listing and watching `resource` in `ns`.
    pub fn forbid(&self, resource: &str, ns: &str, forbidden: bool) {
        let pair = (resource.to_owned(), ns.to_owned());
        let mut st = self.state.lock().unwrap();
        st.forbidden.retain(|p| *p != pair);
        if forbidden {
            st.forbidden.push(pair);
        }
    }

    fn respond(status: u16, body: Value) -> hyper::Response<Body> {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())).boxed())
            .unwrap()
    }

    /// The object as the API server holds it now.
    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(&(resource.to_owned(), ns.to_owned(), name.to_owned())).cloned()
    }

    fn handle(&self, method: &hyper::Method, uri: &hyper::Uri, body: &[u8]) -> hyper::Response<Body> {
        let path = uri.path().to_owned();
        let query = uri.query().unwrap_or("").to_owned();
        self.requests.lock().unwrap().push(format!("{method} {path}?{query}"));
        if self.state.lock().unwrap().down.is_some() {
            return Self::respond(
                503,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "message": "down for the test"}),
            );
        }
        if method == hyper::Method::PATCH {
            // Only the status subresource: .../namespaces/{ns}/{resource}/{name}/status
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            if let ["apis", "keyswap.dev", "v1alpha1", "namespaces", ns, res, name, "status"] = parts.as_slice() {
                let patch: Value = serde_json::from_slice(body).unwrap_or_default();
                let Some(mut obj) = self.get(res, ns, name) else {
                    return Self::respond(404, json!({"kind": "Status", "code": 404}));
                };
                obj["status"] = patch["status"].clone();
                {
                    let mut st = self.state.lock().unwrap();
                    self.record(&mut st, res, ns, name, "MODIFIED", obj.clone());
                }
                self.changed.notify_waiters();
                return Self::respond(200, self.get(res, ns, name).unwrap_or(obj));
            }
            return Self::respond(405, json!({"kind": "Status", "code": 405}));
        }
        let Some(q) = parse(&path, &query) else {
            return Self::respond(
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}),
            );
        };
        let forbidden = q
            .namespace
            .as_ref()
            .is_some_and(|ns| self.state.lock().unwrap().forbidden.iter().any(|(r, n)| *r == q.resource && n == ns));
        if forbidden {
            let ns = q.namespace.as_deref().unwrap_or_default();
            let message = format!(
                "{} is forbidden: User \"system:serviceaccount:keyswap:keyswap\" cannot list resource \"{}\" in API group \"\" in the namespace \"{ns}\"",
                q.resource, q.resource
            );
            return Self::respond(
                403,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": message}),
            );
        }
        let matches = move |q: &Query, resource: &str, ns: &str, name: &str, obj: &Value| {
            resource == q.resource
                && q.namespace.as_deref().is_none_or(|n| n == ns)
                && q.name.as_deref().is_none_or(|n| n == name)
                && q.label.as_ref().is_none_or(|(k, v)| obj["metadata"]["labels"][k] == json!(v))
        };
        if !q.watch {
            let st = self.state.lock().unwrap();
            let items: Vec<Value> =
                st.objects.iter().filter(|((r, ns, n), v)| matches(&q, r, ns, n, v)).map(|(_, v)| v.clone()).collect();
            let (api_version, kind) = kind_of(&q.resource);
            return Self::respond(
                200,
                json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            );
        }
        // A watch: replay what happened since `resourceVersion`, then follow.
        {
            let st = self.state.lock().unwrap();
            if st.gone_as_http && q.rv.is_some_and(|rv| rv < st.compacted_below) {
                return Self::respond(
                    410,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {}", q.rv.unwrap_or_default())}),
                );
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        let this = self.clone();
        tokio::spawn(async move {
            let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
            let (mut sent, generation) = {
                let st = this.state.lock().unwrap();
                (q.rv.unwrap_or(st.rv), st.generation)
            };
            if sent < this.state.lock().unwrap().compacted_below {
                let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "Expired", "code": 410, "message": format!("too old resource version: {sent}")}});
                let _ = tx.send(line(gone)).await;
                return;
            }
            let deadline = tokio::time::Instant::now() + q.timeout;
            loop {
                let notified = this.changed.notified();
                let (events, current, gen_now) = {
                    let st = this.state.lock().unwrap();
                    let ev: Vec<Value> = st
                        .log
                        .iter()
                        .filter(|(rv, r, ns, n, _, obj)| *rv > sent && matches(&q, r, ns, n, obj))
                        .map(|(_, _, _, _, kind, obj)| json!({"type": kind, "object": obj}))
                        .collect();
                    (ev, st.rv, st.generation)
                };
                if gen_now != generation {
                    return; // cut by the test
                }
                for e in events {
                    if tx.send(line(e)).await.is_err() {
                        return;
                    }
                }
                sent = current;
                let (api_version, kind) = kind_of(&q.resource);
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)), if q.bookmarks => {
                        let bm = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                            "metadata": {"resourceVersion": current.to_string()}}});
                        if tx.send(line(bm)).await.is_err() {
                            return;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => return,
                }
            }
        });
        hyper::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed())
            .unwrap()
    }
}
