//! The gateway CA from a Kubernetes Secret of type `kubernetes.io/tls` (`tls.crt`, `tls.key`), as
//! cert-manager writes one: followed as it rotates, so a new CA re-mints the leaf at once.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::Notify;

use super::watch::watch;
use super::KubeStatus;
use crate::certs::{Ca, CaCell};
use crate::vocab::Key;

/// Watches the Secret `key` and keeps `cell` holding the CA it carries. A Secret that is missing,
/// of another type, or holds no usable CA is logged (never its contents) and the current CA stays.
pub fn watch_ca_secret(client: Client, key: Key, cell: CaCell, status: Arc<KubeStatus>) -> tokio::task::JoinHandle<()> {
    let api: Api<Secret> = Api::namespaced(client, &key.namespace);
    let changed = Arc::new(Notify::new());
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", key.name));
    let watched = watch(api, cfg, changed.clone(), status);
    tokio::spawn(async move {
        let _watch = AbortOnDrop(watched.task);
        let mut last: Option<String> = None;
        loop {
            changed.notified().await;
            let secret = watched.store.state().into_iter().find(|s| s.metadata.name.as_deref() == Some(&key.name));
            let version = secret.as_ref().and_then(|s| s.metadata.resource_version.clone());
            if version.is_some() && version == last {
                continue;
            }
            last = version;
            match secret.as_deref().map(|s| ca_of(s, &key)) {
                Some(Ok(ca)) => {
                    tracing::info!(secret = %key, ca = %ca.fingerprint(), not_after = %ca.not_after(), "loaded the gateway CA");
                    cell.store(Some(Arc::new(ca)));
                }
                Some(Err(e)) => {
                    tracing::error!(secret = %key, error = %e, "cannot use the gateway CA Secret; keeping the current CA")
                }
                None if watched.synced.load(std::sync::atomic::Ordering::Relaxed) => tracing::error!(
                    secret = %key,
                    "the gateway CA Secret does not exist; keeping the current CA (routed hosts fail TLS without one)"
                ),
                None => {}
            }
        }
    })
}

/// The CA in a `kubernetes.io/tls` Secret.
fn ca_of(secret: &Secret, key: &Key) -> Result<Ca, String> {
    let ty = secret.type_.as_deref().unwrap_or("Opaque");
    if ty != "kubernetes.io/tls" {
        return Err(format!("type is {ty}, expected kubernetes.io/tls"));
    }
    let field = |name: &str| {
        let data = secret.data.as_ref().and_then(|d| d.get(name)).ok_or_else(|| format!("no `{name}`"))?;
        String::from_utf8(data.0.clone()).map_err(|_| format!("`{name}` is not PEM text"))
    };
    let (cert, private) = (field("tls.crt")?, field("tls.key")?);
    Ca::from_pem(&cert, &private, &format!("Secret {key}")).map_err(|e| e.to_string())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
