//! TokenBudgets: validated on their own, compiled per gateway (those attached to the gateway
//! apply to every route of it, those attached to a route to that route), and the gateway's Redis.

use std::collections::BTreeMap;
use std::sync::Arc;

use secrecy::ExposeSecret as _;

use super::{label, resolve_ref, Catalog};
use crate::api::{BudgetKey, EgressGatewaySpec, TokenBudgetSpec};
use crate::budget::redis::RedisTarget;
use crate::budget::{Budget, KeyBy};
use crate::config::error::ConfigError;
use crate::config::load::{Key, Kind};

/// The default `reservation.defaultOutputTokens`.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 4096;
/// `reservation.referencedInputTokens` when unset.
pub const DEFAULT_REFERENCED_INPUT_TOKENS: u64 = 16_384;
/// The largest model weight.
const MAX_WEIGHT: f64 = 1000.0;

impl Catalog {
    /// Each budget: parents, at least one limit, a label exactly with `key: Label`, weights and
    /// reservation values in range.
    pub(super) fn validate_budgets(&self, errors: &mut Vec<ConfigError>) {
        for (key, b) in &self.budgets {
            let err =
                |f: String, m: String| ConfigError::new(m).at(&b.origin).object(label(Kind::TokenBudget, key)).field(f);
            let s = &b.spec;
            self.check_parent_refs(&s.parent_refs, key, &[Kind::AIProviderRoute, Kind::EgressGateway], &err, errors);
            if let Some((field, _)) = &s.unparsed {
                let why = "did not parse (see the error above); the routes it attaches to answer 503 budget_invalid until it is fixed";
                errors.push(err(field.clone(), why.into()));
                continue;
            }
            let l = &s.limits;
            let limits = [l.requests, l.input_tokens, l.output_tokens, l.total_tokens];
            if limits.iter().all(Option::is_none) && l.concurrent_requests.is_none() {
                errors.push(err(
                    "spec.limits".into(),
                    "needs at least one of requests, inputTokens, outputTokens, totalTokens, concurrentRequests".into(),
                ));
            }
            if l.concurrent_requests == Some(0) {
                errors.push(err("spec.limits.concurrentRequests".into(), "must be at least 1".into()));
            }
            for (name, v) in ["requests", "inputTokens", "outputTokens", "totalTokens"].iter().zip(limits) {
                if v.is_some_and(|v| v > i64::MAX as u64 / 4) {
                    errors.push(err(format!("spec.limits.{name}"), format!("must be at most {}", i64::MAX / 4)));
                }
            }
            match (s.key, &s.label) {
                (BudgetKey::Label, None) => {
                    errors.push(err("spec.label".into(), "is required with key: Label".into()));
                }
                (BudgetKey::Label, Some(l)) if l.is_empty() => {
                    errors.push(err("spec.label".into(), "must not be empty".into()));
                }
                (k, Some(_)) if k != BudgetKey::Label => {
                    errors.push(err("spec.label".into(), "applies only to key: Label".into()));
                }
                _ => {}
            }
            for (i, w) in s.model_weights.iter().enumerate() {
                if w.model.is_empty() {
                    errors.push(err(format!("spec.modelWeights[{i}].model"), "must not be empty".into()));
                }
                if !(w.weight > 0.0 && w.weight <= MAX_WEIGHT) {
                    errors.push(err(
                        format!("spec.modelWeights[{i}].weight"),
                        format!("must be greater than 0 and at most {MAX_WEIGHT}"),
                    ));
                }
            }
            if let Some(r) = &s.reservation {
                if r.bytes_per_input_token == Some(0) {
                    errors.push(err("spec.reservation.bytesPerInputToken".into(), "must be at least 1".into()));
                }
                if r.default_output_tokens.is_some_and(|v| v > i64::MAX as u64 / 4) {
                    errors.push(err("spec.reservation.defaultOutputTokens".into(), "is too large".into()));
                }
                if r.referenced_input_tokens.is_some_and(|v| v > i64::MAX as u64 / 4) {
                    errors.push(err("spec.reservation.referencedInputTokens".into(), "is too large".into()));
                }
            }
        }
    }

    /// The gateway's Redis: `None` without `spec.budgetStore`; `Err` when its Secret or key is
    /// missing, or the URL is not one.
    pub(super) fn budget_store(&self, gateway: &Key, gw: &EgressGatewaySpec) -> Option<Result<RedisTarget, String>> {
        let redis = &gw.budget_store.as_ref()?.redis;
        let skey = Key::new(gateway.namespace.clone(), redis.secret_ref.name.clone());
        let url_key = redis.url_key.as_deref().unwrap_or("url");
        let target = (|| {
            if redis.secret_ref.namespace.is_some() {
                return Err("spec.budgetStore.redis.secretRef.namespace is not allowed: the Secret is read in the \
                            gateway's namespace"
                    .to_owned());
            }
            let secret = self.secrets.get(&skey).ok_or_else(|| format!("Secret {skey} not found"))?;
            let value =
                secret.spec.entries.get(url_key).ok_or_else(|| format!("Secret {skey} has no key `{url_key}`"))?;
            let url = std::str::from_utf8(value.expose_secret())
                .map_err(|_| format!("Secret {skey} key `{url_key}` is not UTF-8"))?
                .trim();
            let ca = match &redis.ca_key {
                None => None,
                Some(k) => Some(
                    secret
                        .spec
                        .entries
                        .get(k)
                        .ok_or_else(|| format!("Secret {skey} has no key `{k}`"))?
                        .expose_secret()
                        .to_vec(),
                ),
            };
            RedisTarget::new(url, ca, skey.to_string().into()).map_err(|m| format!("Secret {skey} key `{url_key}` {m}"))
        })();
        Some(target)
    }
}

/// The budgets that apply to one gateway's routes: those attached to the gateway itself, and
/// those attached to each route.
pub(super) struct GatewayBudgets {
    on_gateway: Vec<Arc<Budget>>,
    on_route: BTreeMap<Key, Vec<Arc<Budget>>>,
}

impl GatewayBudgets {
    pub(super) fn new(catalog: &Catalog, gateway: &Key) -> GatewayBudgets {
        let mut g = GatewayBudgets { on_gateway: Vec::new(), on_route: BTreeMap::new() };
        let valid = catalog.budgets.iter().map(|(k, b)| (k, b, None));
        let left_out = catalog.rejected.budgets.iter().map(|(k, b)| {
            (k, b, Some(Arc::from(format!("TokenBudget {k} is invalid and left out (see `keyswap check`)"))))
        });
        for (key, b, invalid) in valid.chain(left_out) {
            let compiled = Arc::new(Budget { invalid, ..compile(key, &b.spec) });
            for r in &b.spec.parent_refs {
                match resolve_ref(r, key, Kind::AIProviderRoute) {
                    Ok((Kind::EgressGateway, k)) if &k == gateway => g.on_gateway.push(compiled.clone()),
                    Ok((Kind::AIProviderRoute, k)) => g.on_route.entry(k).or_default().push(compiled.clone()),
                    _ => {}
                }
            }
        }
        g
    }

    /// The budgets attached to the gateway itself, by name.
    pub(super) fn on_gateway(&self) -> Arc<[Arc<Budget>]> {
        let mut all = self.on_gateway.clone();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.dedup_by(|a, b| a.name == b.name);
        all.into()
    }

    /// The budgets of `route`'s requests: the gateway's, then the route's own.
    pub(super) fn of(&self, route: &Key) -> Arc<[Arc<Budget>]> {
        let own = self.on_route.get(route).map(Vec::as_slice).unwrap_or_default();
        let mut all: Vec<Arc<Budget>> = self.on_gateway.iter().chain(own).cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.dedup_by(|a, b| a.name == b.name);
        all.into()
    }
}

fn compile(key: &Key, s: &TokenBudgetSpec) -> Budget {
    let l = &s.limits;
    let reservation = s.reservation.clone().unwrap_or_default();
    Budget {
        name: key.to_string().into(),
        key: KeyBy::of(s.key, s.label.as_deref()),
        window: s.window,
        limits: [l.requests, l.input_tokens, l.output_tokens, l.total_tokens],
        concurrent: l.concurrent_requests,
        weights: s.model_weights.iter().map(|w| (w.model.as_str().into(), w.weight)).collect(),
        default_output_tokens: reservation.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS),
        bytes_per_input_token: u64::from(reservation.bytes_per_input_token.unwrap_or(1).max(1)),
        referenced_input_tokens: reservation.referenced_input_tokens.unwrap_or(DEFAULT_REFERENCED_INPUT_TOKENS),
        fail_closed: s.on_store_unavailable == crate::api::StoreFailure::FailClosed,
        refuse_unmetered: s.unmetered_requests == crate::api::UnmeteredRequests::Refuse,
        invalid: None,
        metrics: Default::default(),
    }
}
