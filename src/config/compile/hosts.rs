//! Which routes keep which hosts: a host is one namespace's at most, the gateway's own first.

use std::collections::BTreeMap;

use super::{label, GatewayCompile};
use crate::config::error::ConfigError;
use crate::config::load::{Key, Kind};
use crate::config::snapshot::MatchEntry;

impl GatewayCompile<'_> {
    /// Which namespace's route a host is. Another namespace's route loses a host (an error on
    /// that route), whatever the matching tiers would say, where:
    /// - the gateway's namespace routes it (exactly or by pattern; valid or failing closed): an
    ///   exact host is tried before a pattern, so `x.openai.azure.com` elsewhere would win over the
    ///   platform's `*.openai.azure.com`; or it is a pattern over one of that namespace's patterns
    ///   (`*.*.azure.com`, whose hosts the platform's pattern leaves a path or model of);
    /// - the gateway's `allow` list names it, or it is a pattern over an entry there: agents
    ///   tunnel there with their own credentials, and a route would terminate it for every agent
    ///   and send them all on a team's key;
    /// - a third namespace's route names it too, or it is a pattern over a third namespace's
    ///   pattern: matching would give every agent's requests to whichever namespace sorts first
    ///   (its key, its provider account reading them all), so a contested host is neither's, and
    ///   the broader of two patterns yields. (An exact host under another namespace's pattern is
    ///   the exact host's namespace's for every path: [`crate::config::snapshot::RouteMatcher`].)
    pub(super) fn keep_own_hosts(&mut self) {
        let gateway_ns = self.gateway.namespace.clone();
        let own_ns = |e: &MatchEntry| e.namespace() == gateway_ns;
        let own: Vec<(Box<str>, &'static crate::provider::Provider)> = self
            .entries
            .iter()
            .filter(|e| own_ns(e))
            .flat_map(|e| e.hosts.iter().map(|h| (h.clone(), e.provider)))
            .collect();
        let allowed: Vec<Box<str>> = (self.catalog.gateways.get(self.gateway).into_iter())
            .flat_map(|gw| gw.spec.allow.iter().filter_map(|a| crate::config::snapshot::Allowed::parse(a).ok()))
            .map(|a| a.host)
            .collect();
        let mut claims: BTreeMap<Box<str>, std::collections::BTreeSet<String>> = BTreeMap::new();
        for e in self.entries.iter().filter(|e| !own_ns(e)) {
            for h in &e.hosts {
                claims.entry(h.clone()).or_default().insert(e.namespace().to_owned());
            }
        }
        // As the route matcher reads a pattern (Bedrock's `*` a region only).
        let under =
            |pattern: &str, h: &str| crate::glob::is_pattern(pattern) && crate::glob::matches(pattern, h, Some(b'.'));
        // `h` (a pattern) covers pattern `p`: every host `p` matches, `h` matches too.
        let over = |h: &str, p: &str| crate::glob::is_pattern(p) && h != p && under(h, p);
        let why_not = |h: &str, ns: &str| -> Option<String> {
            if own.iter().any(|(o, p)| **o == *h || (under(o, h) && p.admits_host(o, h))) {
                return Some(format!("is routed by EgressGateway {}'s own namespace", self.gateway));
            }
            if own.iter().any(|(o, _)| over(h, o)) {
                return Some(format!("covers a host pattern EgressGateway {}'s own namespace routes", self.gateway));
            }
            if allowed.iter().any(|a| **a == *h || under(a, h) || under(h, a)) {
                return Some(format!(
                    "is, or covers, an entry of EgressGateway {}'s allow list (agents tunnel there with their own \
                     credentials)",
                    self.gateway
                ));
            }
            // (Other namespaces are not named: a team's status must not list the others.)
            let theirs = |nss: &std::collections::BTreeSet<String>| nss.iter().any(|o| o != ns);
            if claims.get(h).is_some_and(theirs) {
                return Some("is also routed by another namespace: a host two namespaces claim is neither's".into());
            }
            claims
                .iter()
                .any(|(p, nss)| over(h, p) && theirs(nss))
                .then(|| "covers a host pattern another namespace routes: of two patterns, the broader yields".into())
        };
        let catalog = self.catalog;
        for e in self.entries.iter_mut().filter(|e| !own_ns(e)) {
            let (mut lost, ns) = (Vec::new(), e.namespace().to_owned());
            e.hosts.retain(|h| match why_not(h, &ns) {
                Some(why) => {
                    lost.push((h.clone(), why));
                    false
                }
                None => true,
            });
            for (h, why) in lost {
                let m = format!("host `{h}` {why}; left out of this route (rule {} match {})", e.rule, e.index);
                self.errors.push(route_error(catalog, &e.route, m));
            }
        }
        self.entries.retain(|e| !e.hosts.is_empty());
    }

    /// At most [`MAX_GATEWAY_HOSTS`] distinct hosts of at most [`MAX_GATEWAY_HOST_BYTES`] in all,
    /// kept in compiled order (the gateway's own namespace first): one leaf certificate names them
    /// all, and a certificate past 64 KiB is one no TLS client takes (rustls's limit; OpenSSL's
    /// is about 100 KB), for any host. A route whose hosts come past the cap loses them (an error
    /// on that route) instead of breaking every other route's TLS.
    pub(super) fn cap_hosts(&mut self) {
        let mut seen = std::collections::HashSet::new();
        let mut bytes = 0;
        // The gateway's namespace first, its routes failing closed too (compiled last): hosts
        // left out of them would stop failing closed.
        let gateway_ns = self.gateway.namespace.clone();
        let catalog = self.catalog;
        let (mine, theirs): (Vec<_>, Vec<_>) = self.entries.iter_mut().partition(|e| e.namespace() == gateway_ns);
        for e in mine.into_iter().chain(theirs) {
            let mut lost = Vec::new();
            e.hosts.retain(|h| {
                // (A SAN entry: the name and a few bytes of DER around it.)
                let keep = seen.contains(h)
                    || (seen.len() < MAX_GATEWAY_HOSTS && bytes + h.len() + 4 <= MAX_GATEWAY_HOST_BYTES);
                if keep && seen.insert(h.clone()) {
                    bytes += h.len() + 4;
                } else if !keep {
                    lost.push(h.clone());
                }
                keep
            });
            if let Some(first) = lost.first() {
                let m = format!(
                    "{} host(s) from `{first}` on are past what one gateway terminates ({MAX_GATEWAY_HOSTS} hosts, \
                     {MAX_GATEWAY_HOST_BYTES} bytes of names: one certificate names them all); left out of this \
                     route (rule {} match {})",
                    lost.len(),
                    e.rule,
                    e.index
                );
                self.errors.push(route_error(catalog, &e.route, m));
            }
        }
        self.entries.retain(|e| !e.hosts.is_empty());
    }
}

/// An error on the `spec.rules` of the route `namespace/name` an entry was compiled from, at its
/// place in the manifests.
fn route_error(catalog: &super::Catalog, route: &str, message: String) -> ConfigError {
    let (ns, name) = route.split_once('/').unwrap_or(("", route));
    let key = Key::new(ns, name);
    let err = ConfigError::new(message).object(label(Kind::AIProviderRoute, &key)).field("spec.rules");
    match catalog.routes.get(&key) {
        Some(r) => err.at(&r.origin),
        None => err,
    }
}

/// The most distinct hosts one gateway routes ([`GatewayCompile::cap_hosts`]).
pub const MAX_GATEWAY_HOSTS: usize = 1000;
/// The most bytes of host names one gateway routes, a few bytes more per name counted.
pub const MAX_GATEWAY_HOST_BYTES: usize = 40 * 1024;
