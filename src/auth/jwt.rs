//! The `jwt` validator: OIDC-style bearer tokens verified with keys from a JWKS (file or HTTPS
//! URL) or an HS256 secret.
//!
//! Signature, issuer, audience, `exp`/`nbf` (with leeway) are checked by `jsonwebtoken`. The
//! algorithm is never chosen by the token alone: RS256 and ES256 need a JWKS key of that family
//! (by `kid`), HS256 needs the configured secret — so `alg: none` and HS256-signed-with-the-RSA-
//! public-key are refused. Keys are cached per JWKS source across configuration reloads;
//! an unknown `kid` makes the request wait for one refetch (at most one per [`REFETCH_COOLDOWN`]).

use super::verified::{make_room, mono_us, unix_now, VerifiedCache, FAILED_CHECK_SHARE, MAX_CACHED_TOKENS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, FutureExt as _, Shared};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::{Identity, Rejection};

/// An unknown `kid` triggers at most one refetch per source in this interval.
pub const REFETCH_COOLDOWN: Duration = Duration::from_secs(5);
/// How long a request waits for a JWKS refetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a `jwksFile` is read again while tokens are checked against it: a key removed from
/// the file stops admitting within this, whether or not anything else reloads.
pub const FILE_RECHECK: Duration = Duration::from_secs(1);
/// The largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where keys come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    File(std::path::PathBuf),
    Url(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Url(u) => f.write_str(u),
        }
    }
}

struct KeySet {
    keys: HashMap<String, (Algorithm, DecodingKey)>,
    /// Keys without a `kid`: used when the token names none.
    unnamed: Vec<(Algorithm, DecodingKey)>,
}

impl KeySet {
    /// The keys held, named or not.
    fn len(&self) -> usize {
        self.keys.len() + self.unnamed.len()
    }
}

/// A JWKS source and its current keys: read lock-free, refreshed single-flight.
pub struct Jwks {
    pub source: Source,
    keys: ArcSwap<KeySet>,
    /// `jwksRefreshSeconds` in milliseconds: the latest configuration's (a reload changes it).
    refresh_every_ms: AtomicU64,
    /// SHA-256 of the document the keys came from: a fetch of the same document changes nothing.
    document: Mutex<[u8; 32]>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last fetch attempt and the last success.
    last_attempt_ms: AtomicU64,
    last_success_ms: AtomicU64,
    inflight: Mutex<Option<Shared<BoxFuture<'static, ()>>>>,
    /// Bumped whenever the keys change: verified-token caches drop what older keys admitted.
    generation: AtomicU64,
    /// The last fetch failed: the next failure is not logged again (a file is read every second).
    failing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jwks({}, {} keys)", self.source, self.keys.load().keys.len())
    }
}

/// Parses a JWKS document: RSA keys for RS256, P-256 EC keys for ES256; others are skipped.
/// With the document's SHA-256. A document with no usable key is taken as it is (its validator
/// then admits no one): emptying a JWKS is how an operator revokes its last key.
/// Only a document that is no JWKS (a half-written file, an error page) keeps the keys held.
fn parse_jwks(bytes: &[u8]) -> Result<(KeySet, [u8; 32]), String> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut out = KeySet { keys: HashMap::new(), unnamed: Vec::new() };
    for jwk in &set.keys {
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        match &jwk.common.key_id {
            Some(kid) => {
                out.keys.insert(kid.clone(), (alg, key));
            }
            None => out.unnamed.push((alg, key)),
        }
    }
    Ok((out, super::token_digest(bytes)))
}

/// Logged when a JWKS holds no key keyswap can use.
const NO_KEY: &str = "JWKS holds no RS256 (RSA) or ES256 (P-256) key: this validator admits no one";

type Registry = Mutex<HashMap<Source, Weak<Jwks>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Default::default)
}

impl Jwks {
    /// How many usable keys it holds now (0 for a URL not yet fetched).
    pub fn key_count(&self) -> usize {
        self.keys.load().len()
    }

    /// The cache for `source`, shared by every configuration that names it, and what is wrong
    /// with it. A file is read now; a URL is fetched on first use. A file that cannot be read (or
    /// is no JWKS) is a problem of that validator alone, never of the whole configuration (every
    /// other rotation and revocation still takes effect): a validator that held keys keeps them,
    /// as when its periodic re-read fails (a mounted file mid-update), and a new one admits no
    /// one; both pick the file up once it reads.
    pub fn for_source(source: Source, refresh_every: Duration) -> (Arc<Jwks>, Option<String>) {
        let read_file = |p: &std::path::Path| {
            let bytes = std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            parse_jwks(&bytes).map_err(|e| format!("{}: {e}", p.display()))
        };
        let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        reg.retain(|_, w| w.strong_count() > 0);
        if let Some(existing) = reg.get(&source).and_then(Weak::upgrade) {
            existing.refresh_every_ms.store(refresh_every.as_millis() as u64, Ordering::Relaxed);
            if let Source::File(p) = &source {
                // A reload re-reads the file: an edited JWKS takes effect with the configuration.
                match read_file(p) {
                    Ok(read) => {
                        let empty = read.0.len() == 0;
                        if existing.replace(read) && empty {
                            tracing::warn!(jwks = %existing.source, NO_KEY);
                        }
                    }
                    Err(m) => return (existing, Some(format!("{m}; the validator keeps the keys it last read"))),
                }
            }
            return (existing, None);
        }
        let empty = || (KeySet { keys: HashMap::new(), unnamed: Vec::new() }, [0; 32]);
        let mut problem = None;
        let (keys, document) = match &source {
            Source::File(p) => match read_file(p) {
                Ok(read) => {
                    if read.0.len() == 0 {
                        tracing::warn!(jwks = %source, NO_KEY);
                    }
                    read
                }
                Err(m) => {
                    problem = Some(format!("{m}; until it reads, the validator admits no one"));
                    empty()
                }
            },
            Source::Url(_) => empty(),
        };
        let jwks = Arc::new(Jwks {
            source: source.clone(),
            keys: ArcSwap::from_pointee(keys),
            refresh_every_ms: AtomicU64::new(refresh_every.as_millis() as u64),
            document: Mutex::new(document),
            epoch: Instant::now(),
            // A file was just read; a URL is fetched by the first request that needs a key.
            last_attempt_ms: AtomicU64::new(matches!(source, Source::File(_)) as u64),
            last_success_ms: AtomicU64::new(0),
            inflight: Mutex::new(None),
            generation: AtomicU64::new(0),
            failing: std::sync::atomic::AtomicBool::new(false),
        });
        reg.insert(source, Arc::downgrade(&jwks));
        (jwks, problem)
    }

    /// Takes the keys of a document read, unless it is the one held: verified tokens are
    /// dropped (checked again) only when the keys changed, so an agent that makes keyswap
    /// refetch (a token naming an unknown key) cannot make every agent's token be checked again.
    fn replace(&self, (keys, document): (KeySet, [u8; 32])) -> bool {
        let mut held = self.document.lock().unwrap_or_else(|e| e.into_inner());
        if *held == document {
            return false;
        }
        *held = document;
        self.keys.store(Arc::new(keys));
        self.generation.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a request with an unknown `kid` should wait for keys: a fetch is under way, or
    /// the last one is older than the cooldown.
    fn may_refetch(&self) -> bool {
        if self.inflight.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return true;
        }
        let last = self.last_attempt_ms.load(Ordering::Relaxed);
        last == 0 || self.now_ms().saturating_sub(last) >= REFETCH_COOLDOWN.as_millis() as u64
    }

    /// Refetches the keys (single flight); resolves when done, successful or not.
    pub fn refresh(self: &Arc<Self>) -> Shared<BoxFuture<'static, ()>> {
        let mut slot = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = slot.as_ref() {
            return f.clone();
        }
        self.last_attempt_ms.store(self.now_ms().max(1), Ordering::Relaxed);
        let this = self.clone();
        let fut = async move {
            let result = tokio::time::timeout(FETCH_TIMEOUT, this.fetch()).await;
            match result {
                Ok(Ok(read)) => {
                    let keys = read.0.len();
                    match this.replace(read) {
                        true if keys == 0 => tracing::warn!(jwks = %this.source, NO_KEY),
                        true => tracing::info!(jwks = %this.source, keys, "JWKS loaded"),
                        false => tracing::debug!(jwks = %this.source, keys, "JWKS unchanged"),
                    }
                    this.last_success_ms.store(this.now_ms().max(1), Ordering::Relaxed);
                    if this.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(jwks = %this.source, "JWKS readable again");
                    }
                }
                Ok(Err(e)) if !this.failing.swap(true, Ordering::Relaxed) => {
                    tracing::warn!(jwks = %this.source, error = %e, "JWKS fetch failed; keeping the keys held")
                }
                Err(_) if !this.failing.swap(true, Ordering::Relaxed) => {
                    tracing::warn!(jwks = %this.source, "JWKS fetch timed out; keeping the keys held")
                }
                Ok(Err(e)) => tracing::debug!(jwks = %this.source, error = %e, "JWKS fetch failed again"),
                Err(_) => tracing::debug!(jwks = %this.source, "JWKS fetch timed out again"),
            }
            *this.inflight.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        .boxed()
        .shared();
        *slot = Some(fut.clone());
        fut
    }

    async fn fetch(&self) -> Result<(KeySet, [u8; 32]), String> {
        let bytes = match &self.source {
            Source::File(p) => tokio::fs::read(p).await.map_err(|e| format!("cannot read {}: {e}", p.display()))?,
            Source::Url(u) => {
                use http_body_util::BodyExt as _;
                let uri: hyper::Uri = u.parse().map_err(|e| format!("{e}"))?;
                let client = crate::http::client(&uri, false)?;
                let req = hyper::Request::get(uri)
                    .header("accept", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .map_err(|e| e.to_string())?;
                let resp = client.request(req).await.map_err(|e| crate::http::error_chain(&e))?;
                if !resp.status().is_success() {
                    return Err(format!("answered {}", resp.status()));
                }
                let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES);
                body.collect().await.map_err(|e| format!("reading the JWKS: {e}"))?.to_bytes().to_vec()
            }
        };
        parse_jwks(&bytes)
    }

    /// Starts a background refresh when the keys are older than the refresh interval (a file's:
    /// [`FILE_RECHECK`]; reading it again changes nothing unless its content did).
    fn refresh_if_stale(self: &Arc<Self>) {
        let every = match self.source {
            Source::File(_) => FILE_RECHECK.as_millis() as u64,
            Source::Url(_) => self.refresh_every_ms.load(Ordering::Relaxed),
        };
        // Never fetched: the first request that needs a key fetches (and waits).
        let last = self.last_attempt_ms.load(Ordering::Relaxed);
        if last == 0 || self.now_ms().saturating_sub(last) < every {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let f = self.refresh();
            rt.spawn(f);
        }
    }
}

/// Which claims make the identity.
#[derive(Clone, Debug)]
pub struct ClaimMapping {
    pub subject: String,
    pub tenant: Option<String>,
    pub role: Option<String>,
}

pub struct JwtValidator {
    pub name: Arc<str>,
    pub jwks: Option<Arc<Jwks>>,
    pub hs256: Option<DecodingKey>,
    pub validation: Validation,
    pub claims: ClaimMapping,
    /// Tokens already verified: agents reuse one JWT for many requests, and an ES256 check costs
    /// ~240 µs here. Entries hold until the token's `exp` (plus leeway) or a JWKS change.
    pub cache: VerifiedCache,
}

impl std::fmt::Debug for JwtValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jwt({}, jwks {:?}, hs256 {})", self.name, self.jwks, self.hs256.is_some())
    }
}

/// What a JWT validator made of a token.
pub enum Verdict {
    Admitted(Identity),
    Rejected(Rejection),
    /// Not a JWT at all, or one another issuer signed: the next validator may know it.
    NotJwt,
    /// The token names a key this source does not hold (yet): wait for a refetch, then retry.
    NeedKeys(Arc<Jwks>),
}

/// A claim as a string: the value, or the one string of an array of one. An array of several
/// (`groups`, `orgs`) names none: which of them came first is the identity provider's ordering,
/// and a member of one group who joins another would otherwise be read as that one.
fn claim_str(v: Option<&serde_json::Value>) -> Option<&str> {
    match v? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Array(a) => match a.as_slice() {
            [one] => one.as_str(),
            _ => None,
        },
        _ => None,
    }
}

/// The claims read before a token's signature is checked: what would refuse it anyway costs no
/// signature check.
#[derive(serde::Deserialize)]
struct Unverified {
    iss: Option<String>,
    exp: Option<serde_json::Value>,
    aud: Option<serde_json::Value>,
}

/// A token's claims, read without verifying them; `None` when the payload does not decode.
fn unverified_claims(token: &str) -> Option<Unverified> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Unverified>(&bytes).ok()
}

impl JwtValidator {
    /// `validation` with issuer, audiences, leeway and required claims set.
    pub fn validation(issuer: &str, audiences: &[String], leeway: u64) -> Validation {
        let mut v = Validation::new(Algorithm::RS256);
        v.set_issuer(&[issuer]);
        v.set_audience(audiences);
        v.leeway = leeway;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v
    }

    pub fn verify(&self, token: &[u8]) -> Verdict {
        let Ok(text) = std::str::from_utf8(token) else { return Verdict::NotJwt };
        if text.split('.').count() != 3 {
            return Verdict::NotJwt;
        }
        let generation = self.jwks.as_ref().map_or(0, |j| j.generation.load(Ordering::Relaxed));
        {
            let mut cache = self.cache.0.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(token) {
                Some((id, until, g)) if *g == generation && unix_now() <= *until => {
                    // The key set is refetched on schedule even while every token is a cached
                    // one: a key the IdP withdrew must not keep its tokens admitted until `exp`.
                    if let Some(j) = &self.jwks {
                        j.refresh_if_stale();
                    }
                    return Verdict::Admitted(id.clone());
                }
                Some(_) => {
                    cache.remove(token);
                }
                None => {}
            }
        }
        let (verdict, until) = self.verify_uncached(text);
        if let (Verdict::Admitted(id), Some(until)) = (&verdict, until) {
            let mut cache = self.cache.0.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_CACHED_TOKENS {
                make_room(&mut cache, generation);
            }
            cache.insert(token.into(), (id.clone(), until, generation));
        }
        verdict
    }

    /// The verdict, and for an admitted token how long it may be cached (`exp` + leeway).
    fn verify_uncached(&self, text: &str) -> (Verdict, Option<u64>) {
        // A token that names another issuer is left to the validator of that issuer, unverified:
        // it never waits for this validator's keys (nor makes it refetch them), and costs no
        // signature check here. (Naming this issuer proves nothing: the full check follows.)
        let claims = unverified_claims(text);
        let iss = claims.as_ref().and_then(|c| c.iss.as_deref());
        if iss.is_some_and(|iss| self.validation.iss.as_ref().is_some_and(|i| !i.contains(iss))) {
            return (Verdict::NotJwt, None);
        }
        // Expired, or for another audience: refused without a key fetch or a signature check
        // (the full check would refuse it too).
        if let Some(refused) = claims.and_then(|c| self.refused_unverified(&c)) {
            return (Verdict::Rejected(refused), None);
        }
        // An unknown or `none` algorithm does not parse: refused, never "not a JWT".
        let Ok(header) = jsonwebtoken::decode_header(text) else {
            return (Verdict::Rejected(Rejection::InvalidToken), None);
        };
        let key = match header.alg {
            Algorithm::HS256 => match &self.hs256 {
                Some(k) => k,
                None => return (Verdict::Rejected(Rejection::InvalidToken), None),
            },
            Algorithm::RS256 | Algorithm::ES256 => {
                let Some(jwks) = &self.jwks else { return (Verdict::Rejected(Rejection::InvalidToken), None) };
                jwks.refresh_if_stale();
                let set = jwks.keys.load();
                let found = match &header.kid {
                    Some(kid) => set.keys.get(kid).filter(|(alg, _)| *alg == header.alg).map(|(_, k)| k.clone()),
                    None => set.unnamed.iter().find(|(alg, _)| *alg == header.alg).map(|(_, k)| k.clone()),
                };
                match found {
                    Some(k) => return self.check(text, header.alg, &k),
                    // A `kid` not held yet, or no key without one (a `jwksUrl` is fetched on first
                    // use, and an IdP whose tokens carry no `kid` would otherwise never get it, nor
                    // get its keys back after it once published an empty set).
                    None if (header.kid.is_some() || set.unnamed.is_empty()) && jwks.may_refetch() => {
                        return (Verdict::NeedKeys(jwks.clone()), None)
                    }
                    None => return (Verdict::Rejected(Rejection::InvalidToken), None),
                }
            }
            _ => return (Verdict::Rejected(Rejection::InvalidToken), None),
        };
        self.check(text, header.alg, key)
    }

    /// Why `c` would be refused whatever its signature: `exp` past (with the leeway) or missing,
    /// or no audience of this validator's.
    fn refused_unverified(&self, c: &Unverified) -> Option<Rejection> {
        let exp = c.exp.as_ref().and_then(serde_json::Value::as_f64);
        match exp {
            None => return Some(Rejection::InvalidToken),
            Some(exp) if exp + (self.validation.leeway as f64) < unix_now() as f64 => {
                return Some(Rejection::ExpiredToken)
            }
            Some(_) => {}
        }
        let ours = |a: &str| self.validation.aud.as_ref().is_some_and(|mine| mine.contains(a));
        let audience = match &c.aud {
            Some(serde_json::Value::String(a)) => ours(a),
            Some(serde_json::Value::Array(all)) => all.iter().filter_map(serde_json::Value::as_str).any(ours),
            _ => false,
        };
        (!audience).then_some(Rejection::InvalidToken)
    }

    fn check(&self, token: &str, alg: Algorithm, key: &DecodingKey) -> (Verdict, Option<u64>) {
        let now = mono_us();
        let failures = &self.cache.1;
        if failures.exhausted(now) {
            if failures.warn_now(now) {
                tracing::warn!(
                    validator = %self.name, share = format_args!("1/{FAILED_CHECK_SHARE}"),
                    "JWT signature checks are failing faster than the limit (forged tokens?): tokens not \
                     verified before are refused unchecked until the rate falls; verified ones are still admitted"
                );
            }
            return (Verdict::Rejected(Rejection::InvalidToken), None);
        }
        let mut v = self.validation.clone();
        v.algorithms = vec![alg];
        let data = match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &v) {
            Ok(d) => d,
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                return (Verdict::Rejected(Rejection::ExpiredToken), None)
            }
            Err(e) => {
                failures.record(now, mono_us().saturating_sub(now));
                tracing::debug!(validator = %self.name, error = ?e.kind(), "JWT refused");
                return (Verdict::Rejected(Rejection::InvalidToken), None);
            }
        };
        let c = &data.claims;
        let Some(agent) = claim_str(c.get(&self.claims.subject)).filter(|s| !s.is_empty()) else {
            // A genuine token refused anyway (no subject claim) is not cached: replayed, each
            // costs a signature check, charged as a failed one so that a replay flood is bounded.
            failures.record(now, mono_us().saturating_sub(now));
            return (Verdict::Rejected(Rejection::InvalidToken), None);
        };
        let tenant = self.claims.tenant.as_ref().and_then(|t| claim_str(c.get(t))).filter(|s| !s.is_empty());
        let role = self.claims.role.as_ref().and_then(|r| match c.get(r)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(a) => Some(a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(",")),
            _ => None,
        });
        let until = c.get("exp").and_then(serde_json::Value::as_u64).map(|e| e.saturating_add(self.validation.leeway));
        let id = Identity {
            agent: agent.into(),
            tenant: tenant.map(Arc::from),
            validator: self.name.clone(),
            role: role.filter(|r| !r.is_empty()).map(Arc::from),
            labels: Vec::new(),
        };
        (Verdict::Admitted(id), until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::verified::{FailedChecks, FAILED_CHECK_BURST_US};

    const SECRET: &[u8] = b"unit-test-hs256-secret-of-32-bytes-or-more";

    fn validator() -> JwtValidator {
        JwtValidator {
            name: "t".into(),
            jwks: None,
            hs256: Some(DecodingKey::from_secret(SECRET)),
            validation: JwtValidator::validation("https://idp", &["keyswap".to_owned()], 30),
            claims: ClaimMapping { subject: "sub".into(), tenant: Some("org".into()), role: Some("roles".into()) },
            cache: VerifiedCache::default(),
        }
    }

    fn token(claims: serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &jsonwebtoken::EncodingKey::from_secret(secret))
            .unwrap()
    }

    fn claims(exp_offset: i64) -> serde_json::Value {
        let exp = unix_now() as i64 + exp_offset;
        serde_json::json!({"iss": "https://idp", "aud": ["other", "keyswap"], "sub": "a1", "org": ["t1", "t2"], "roles": ["r1", "r2"], "exp": exp})
    }

    /// The attack: replay one genuine token the validator refuses after its signature check (it
    /// lacks the subject claim the mapping reads): never cached and never charged, each replay cost
    /// a signature check (~240 µs for ES256) with no limit. Charged as a failed check now.
    #[test]
    fn a_signed_token_without_a_subject_is_charged_as_a_failed_check() {
        let v = validator();
        let mut no_subject = claims(600);
        no_subject.as_object_mut().unwrap().remove("sub");
        let t = token(no_subject, Algorithm::HS256, SECRET);
        let before = v.cache.1.paid_off_us.load(Ordering::Relaxed);
        assert!(matches!(v.verify(t.as_bytes()), Verdict::Rejected(Rejection::InvalidToken)));
        assert!(v.cache.1.paid_off_us.load(Ordering::Relaxed) > before, "not charged to the failed-check limit");
        assert!(v.cache.0.lock().unwrap().is_empty());
    }

    /// The attack: an agent that can mint valid tokens at will (client credentials) sends a new
    /// one each request. The full cache was cleared, so every 10,000 of them every other agent's
    /// token was checked again (an ES256 check each, on the one worker). Now the flooder loses
    /// its own entries and the others keep theirs.
    #[test]
    fn an_agent_minting_tokens_at_will_evicts_only_its_own_from_the_cache() {
        let v = validator();
        let mut victim = claims(600);
        victim["sub"] = serde_json::json!("victim");
        let victim = token(victim, Algorithm::HS256, SECRET);
        assert!(matches!(v.verify(victim.as_bytes()), Verdict::Admitted(_)));
        let flood_id =
            Identity { agent: "flooder".into(), tenant: None, validator: "jwt".into(), role: None, labels: Vec::new() };
        {
            let mut cache = v.cache.0.lock().unwrap();
            for i in 0..MAX_CACHED_TOKENS - 1 {
                cache.insert(format!("flood-{i}").into_bytes().into(), (flood_id.clone(), u64::MAX, 0));
            }
        }
        let mut next = claims(600);
        next["sub"] = serde_json::json!("flooder");
        next["jti"] = serde_json::json!("one-more");
        assert!(matches!(v.verify(token(next, Algorithm::HS256, SECRET).as_bytes()), Verdict::Admitted(_)));
        let cache = v.cache.0.lock().unwrap();
        assert!(cache.contains_key(victim.as_bytes()), "another agent's token was evicted");
        assert!(cache.len() <= MAX_CACHED_TOKENS * 9 / 10 + 1, "{}", cache.len());
    }

    #[test]
    fn verified_tokens_are_cached_until_they_expire_and_never_otherwise() {
        let v = validator();
        let good = token(claims(600), Algorithm::HS256, SECRET);
        let Verdict::Admitted(id) = v.verify(good.as_bytes()) else { panic!("valid token refused") };
        // Two tenants in one claim name none (the IdP's order would choose); one names it.
        assert_eq!((&*id.agent, id.tenant.as_deref(), id.role.as_deref()), ("a1", None, Some("r1,r2")));
        let mut one = claims(600);
        one["org"] = serde_json::json!(["t1"]);
        let Verdict::Admitted(id1) = v.verify(token(one, Algorithm::HS256, SECRET).as_bytes()) else { panic!() };
        assert_eq!(id1.tenant.as_deref(), Some("t1"));
        v.cache.0.lock().unwrap().clear();
        assert!(matches!(v.verify(good.as_bytes()), Verdict::Admitted(_)));
        assert_eq!(v.cache.0.lock().unwrap().len(), 1, "cached");
        assert!(matches!(v.verify(good.as_bytes()), Verdict::Admitted(_)));

        // An entry past its time is dropped and the token checked again (here: now expired).
        let old = token(claims(-600), Algorithm::HS256, SECRET);
        v.cache.0.lock().unwrap().insert(old.as_bytes().into(), (id.clone(), 0, 0));
        assert!(matches!(v.verify(old.as_bytes()), Verdict::Rejected(Rejection::ExpiredToken)));
        assert!(!v.cache.0.lock().unwrap().contains_key(old.as_bytes()), "stale entry removed");

        // Refused tokens are never cached.
        let forged = token(claims(600), Algorithm::HS256, b"another-secret-another-secret-xxxxx");
        assert!(matches!(v.verify(forged.as_bytes()), Verdict::Rejected(Rejection::InvalidToken)));
        let hs384 = token(claims(600), Algorithm::HS384, SECRET);
        assert!(matches!(v.verify(hs384.as_bytes()), Verdict::Rejected(Rejection::InvalidToken)));
        assert_eq!(v.cache.0.lock().unwrap().len(), 1);

        // Not a JWT: the next validator may know it. A malformed header is refused.
        assert!(matches!(v.verify(b"ksa_api-key"), Verdict::NotJwt));
        assert!(matches!(v.verify(b"not.a.jwt"), Verdict::Rejected(Rejection::InvalidToken)));
    }

    /// The attack: an agent floods the gateway with forged tokens of the right issuer and
    /// audience (a garbage signature under a real `kid`): each cost a signature check (~240 µs for
    /// ES256) on keyswap's one worker, which every agent's requests share. Failed checks may take a
    /// fifth of the time: past it, tokens not verified before are refused unchecked (so a new
    /// genuine one too, until it is paid off), and verified tokens are admitted from the cache
    /// throughout. Expired tokens and tokens for another audience cost no check, nor count.
    #[test]
    fn a_flood_of_forged_jwts_costs_a_bounded_number_of_signature_checks() {
        let v = validator();
        let cached = token(claims(600), Algorithm::HS256, SECRET);
        assert!(matches!(v.verify(cached.as_bytes()), Verdict::Admitted(_)));
        let fresh = |n: i64| token(claims(600 + n), Algorithm::HS256, SECRET);
        let forged = |n: i64| token(claims(600 + n), Algorithm::HS256, b"not-the-secret-but-long-enough-xxxxxxxx");
        // Refused before any check: they never exhaust the rate.
        let mut other_audience = claims(600);
        other_audience["aud"] = serde_json::json!("other");
        let mut no_exp = claims(600);
        no_exp.as_object_mut().unwrap().remove("exp");
        for n in 0..1_000 {
            let expired = token(claims(-600 - n), Algorithm::HS256, b"forged-forged-forged-forged-forged");
            assert!(matches!(v.verify(expired.as_bytes()), Verdict::Rejected(Rejection::ExpiredToken)));
        }
        for c in [other_audience, no_exp] {
            let t = token(c, Algorithm::HS256, SECRET);
            assert!(matches!(v.verify(t.as_bytes()), Verdict::Rejected(Rejection::InvalidToken)));
        }
        assert!(!v.cache.1.exhausted(mono_us()), "refused unchecked tokens count as no failed check");
        // Forged HS256 tokens cost microseconds each: a thousand of them take no fifth of the
        // worker, and checks go on.
        for n in 0..1_000 {
            assert!(matches!(v.verify(forged(n).as_bytes()), Verdict::Rejected(Rejection::InvalidToken)));
        }
        assert!(matches!(v.verify(fresh(1).as_bytes()), Verdict::Admitted(_)), "cheap failures hold nothing back");
        // Failed checks that took a second between them (a flood of ES256 ones, ~240 µs each):
        // past a fifth of the time, tokens not verified before are refused unchecked, verified
        // ones still admitted.
        let now = mono_us();
        for _ in 0..1_000 {
            v.cache.1.record(now, 240);
        }
        assert!(v.cache.1.exhausted(mono_us()), "1,000 failures of 240 µs exhaust the share");
        assert!(matches!(v.verify(fresh(2).as_bytes()), Verdict::Rejected(_)), "checked no more while exhausted");
        assert!(matches!(v.verify(cached.as_bytes()), Verdict::Admitted(_)), "verified tokens still admitted");
        // Paid off at the rate it was spent: checks resume.
        let wait = v.cache.1.paid_off_us.load(Ordering::Relaxed).saturating_sub(mono_us() + FAILED_CHECK_BURST_US);
        std::thread::sleep(Duration::from_micros(wait + 20_000));
        assert!(matches!(v.verify(fresh(3).as_bytes()), Verdict::Admitted(_)));
    }

    /// The share is kept with concurrent failures too (one atomic update each).
    #[test]
    fn failed_checks_add_up_from_every_thread() {
        let f = std::sync::Arc::new(FailedChecks::default());
        let now = mono_us();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let f = f.clone();
                std::thread::spawn(move || (0..1_000).for_each(|_| f.record(now, 10)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(f.paid_off_us.load(Ordering::Relaxed), now + 4 * 1_000 * 10 * FAILED_CHECK_SHARE);
    }

    #[test]
    fn jwks_documents_keep_rsa_and_p256_keys_only() {
        let doc = br#"{"keys": [
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-256", "kid": "e", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]}"#;
        let (set, _) = parse_jwks(doc).unwrap();
        assert_eq!(set.keys.keys().collect::<Vec<_>>(), ["e"]);
        let err = |doc: &[u8]| parse_jwks(doc).err().expect("refused");
        assert!(err(b"<html>").contains("not a JWKS"));
        assert!(err(b"").contains("not a JWKS"), "a file being written keeps the keys held");
        // No usable key: taken as it is, the validator admits no one.
        let (none, _) = parse_jwks(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
        assert_eq!(none.len(), 0);
    }

    const EC_DOC: &[u8] = br#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "e", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    /// An operator revokes a leaked signing key, the last of its JWKS, by emptying the document:
    /// "no usable key" was a failed fetch, the keys were held, and the key admitted until a
    /// restart (its verified tokens until their `exp`). Emptied, the set is empty and what it
    /// verified is dropped.
    #[test]
    fn emptying_the_jwks_revokes_its_last_key() {
        let jwks = Jwks::for_source(Source::Url("https://idp.invalid/empty".into()), Duration::from_secs(300)).0;
        assert!(jwks.replace(parse_jwks(EC_DOC).unwrap()));
        let generation = jwks.generation.load(Ordering::Relaxed);
        assert!(jwks.replace(parse_jwks(br#"{"keys": []}"#).unwrap()), "the empty document is taken");
        assert!(jwks.keys.load().keys.is_empty());
        assert!(jwks.generation.load(Ordering::Relaxed) > generation, "verified tokens are dropped");
    }

    /// The attack: an agent sends a token naming a key nobody has, every 5 s. Each makes keyswap
    /// refetch the JWKS, and each refetch dropped every verified token: every agent's JWT was
    /// checked again (an ES256 check costs ~240 µs). A refetch of the same document drops nothing.
    #[test]
    fn forcing_jwks_refetches_does_not_make_every_token_be_checked_again() {
        let jwks = Jwks::for_source(Source::Url("https://idp.invalid/jwks".into()), Duration::from_secs(300)).0;
        assert!(jwks.replace(parse_jwks(EC_DOC).unwrap()), "the first document is taken");
        let generation = jwks.generation.load(Ordering::Relaxed);
        assert!(!jwks.replace(parse_jwks(EC_DOC).unwrap()), "the same document again");
        assert_eq!(jwks.generation.load(Ordering::Relaxed), generation);
        let rotated = std::str::from_utf8(EC_DOC).unwrap().replace("\"kid\": \"e\"", "\"kid\": \"e2\"");
        assert!(jwks.replace(parse_jwks(rotated.as_bytes()).unwrap()));
        assert_eq!(jwks.generation.load(Ordering::Relaxed), generation + 1);
        // A reload with a shorter `jwksRefreshSeconds` (to drop a withdrawn key sooner) applies to
        // the source already shared, not only after a restart.
        let again = Jwks::for_source(Source::Url("https://idp.invalid/jwks".into()), Duration::from_secs(30)).0;
        assert!(Arc::ptr_eq(&jwks, &again));
        assert_eq!(jwks.refresh_every_ms.load(Ordering::Relaxed), 30_000);
    }

    /// A token another issuer signed is left to that issuer's validator: it never waits for this
    /// validator's keys (a hung identity provider locked every other issuer's agents out).
    #[test]
    fn a_token_of_another_issuer_never_waits_for_this_validators_keys() {
        use base64::Engine as _;
        let jwks = Jwks::for_source(Source::Url("https://hung.invalid/jwks".into()), Duration::from_secs(300)).0;
        let v = JwtValidator { jwks: Some(jwks), hs256: None, ..validator() };
        let b64 = |j: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(j.to_string());
        let token = |iss: &str| {
            let header = b64(serde_json::json!({"alg": "RS256", "kid": "unknown"}));
            let claims = b64(serde_json::json!({"iss": iss, "aud": "keyswap", "sub": "a", "exp": unix_now() + 60}));
            format!("{header}.{claims}.c2ln")
        };
        assert!(matches!(v.verify(token("https://idp").as_bytes()), Verdict::NeedKeys(_)), "its own issuer waits");
        assert!(matches!(v.verify(token("https://other-idp").as_bytes()), Verdict::NotJwt));
    }
}
