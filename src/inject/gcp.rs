//! GCP service-account access tokens for `providerAuth.type: GCPServiceAccount`.
//!
//! keyswap mints tokens by the JWT-bearer grant at the key's `token_uri` (the `gcp_auth` crate
//! signs the assertion and calls the endpoint). A [`TokenSource`] per service-account key and
//! scope set caches the token:
//!
//! - the request path reads it without locks ([`TokenSource::cached`]);
//! - the first request waits for one fetch, however many arrive at once (single flight);
//! - a background task refreshes it before it expires;
//! - a failed fetch is never cached: the waiting requests fail closed and the next one tries again;
//! - a rotated key is another source: its tokens start from nothing.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::{FutureExt, Shared};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use tokio::time::Instant;

/// The scope requested when the policy names none.
pub const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The key a `GCPServiceAccount` policy reads when it names none.
pub const DEFAULT_SECRET_KEY: &str = "service-account.json";
/// How long one token request may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A token this close to expiry is not handed out (the request could outlive it).
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Background refresh starts this long before expiry (or at half the lifetime, if shorter).
const REFRESH_AHEAD: Duration = Duration::from_secs(300);

/// A minted token.
pub struct Token {
    /// `Bearer <access token>`, the exact `authorization` value.
    pub header: SecretSlice<u8>,
    pub expires_at: Instant,
    refresh_at: Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<redacted>, expires at {:?})", self.expires_at)
    }
}

/// What a fetch yields: the access token and its lifetime.
pub type Fetched = Result<(SecretString, Duration), String>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Flight = Shared<TokenFuture>;
/// A token being fetched (or the one fetch in flight, joined).
pub type TokenFuture = BoxFuture<Result<Arc<Token>, Arc<str>>>;

/// Gets new tokens. The real one calls the token endpoint; tests may count calls.
pub trait Fetch: Send + Sync + 'static {
    fn fetch(&self) -> BoxFuture<Fetched>;
}

/// The JWT-bearer grant through `gcp_auth`, at the key's own `token_uri`.
pub struct ServiceAccountFetch {
    json: SecretString,
    scopes: Vec<String>,
}

impl Fetch for ServiceAccountFetch {
    fn fetch(&self) -> BoxFuture<Fetched> {
        let json = self.json.clone();
        let scopes = self.scopes.clone();
        Box::pin(async move {
            use gcp_auth::TokenProvider as _;
            // A new account per fetch: gcp_auth keeps its own cache, and keyswap decides when to refresh.
            let account = gcp_auth::CustomServiceAccount::from_json(json.expose_secret())
                .map_err(|e| format!("service-account key: {e}"))?;
            let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
            let token = account.token(&scopes).await.map_err(|e| format!("token request failed: {e}"))?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let left = token.expires_at().timestamp().saturating_sub(now.as_secs() as i64).max(0) as u64;
            Ok((SecretString::from(token.as_str().to_owned()), Duration::from_secs(left)))
        })
    }
}

/// One service-account key with one scope set: its cached token and the fetch in flight.
pub struct TokenSource {
    /// `sha256:…` of the key JSON; what logs show.
    pub fingerprint: String,
    /// `client_email` from the key (not secret; helps at 3 a.m.).
    pub account: String,
    pub scopes: Vec<String>,
    fetcher: Box<dyn Fetch>,
    current: ArcSwapOption<Token>,
    flight: Mutex<Option<Flight>>,
    refresher: std::sync::atomic::AtomicBool,
    /// Completed fetches, successful or not.
    pub fetches: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSource({}, scopes {:?}, <redacted> {})", self.account, self.scopes, self.fingerprint)
    }
}

impl TokenSource {
    pub fn new(account: String, scopes: Vec<String>, fingerprint: String, fetcher: Box<dyn Fetch>) -> Arc<Self> {
        Arc::new(TokenSource {
            fingerprint,
            account,
            scopes,
            fetcher,
            current: ArcSwapOption::empty(),
            flight: Mutex::new(None),
            refresher: false.into(),
            fetches: 0.into(),
        })
    }

    /// The source for a service-account key: shared by every snapshot that uses the same key and
    /// scopes, so that a configuration change elsewhere keeps the token. A new key (rotation)
    /// gets a new source with an empty cache. Sources are told apart by the whole SHA-256 of the
    /// key and its scopes, not the 48-bit fingerprint shown to operators: a key file forged to
    /// share a fingerprint (in a Secret a tenant template picks up) never gets another key's token.
    pub fn for_key(json: &SecretString, account: String, scopes: Vec<String>, fingerprint: String) -> Arc<Self> {
        use sha2::Digest as _;
        static SOURCES: Mutex<Option<HashMap<[u8; 32], Weak<TokenSource>>>> = Mutex::new(None);
        let mut h = sha2::Sha256::new();
        h.update(json.expose_secret().as_bytes());
        for s in &scopes {
            h.update([0]);
            h.update(s.as_bytes());
        }
        let id: [u8; 32] = h.finalize().into();
        let mut guard = SOURCES.lock().unwrap_or_else(|p| p.into_inner());
        let map = guard.get_or_insert_with(HashMap::new);
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(s) = map.get(&id).and_then(Weak::upgrade) {
            return s;
        }
        let fetcher = ServiceAccountFetch { json: json.clone(), scopes: scopes.clone() };
        let s = TokenSource::new(account, scopes, fingerprint, Box::new(fetcher));
        map.insert(id, Arc::downgrade(&s));
        s
    }

    /// The current token if it is good for a while yet. Lock-free.
    pub fn cached(&self) -> Option<Arc<Token>> {
        self.current.load_full().filter(|t| Instant::now() + EXPIRY_MARGIN < t.expires_at)
    }

    /// A usable token: the cached one, or the result of the one fetch in flight (started here if
    /// none is).
    pub async fn token(self: &Arc<Self>) -> Result<Arc<Token>, Arc<str>> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        self.flight().await
    }

    fn flight(self: &Arc<Self>) -> Flight {
        let mut slot = self.flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = slot.as_ref() {
            return f.clone();
        }
        let me = self.clone();
        let fut: TokenFuture = Box::pin(async move {
            let result = me.fetch_once().await;
            *me.flight.lock().unwrap_or_else(|p| p.into_inner()) = None;
            result
        });
        let f = fut.shared();
        *slot = Some(f.clone());
        f
    }

    async fn fetch_once(self: &Arc<Self>) -> Result<Arc<Token>, Arc<str>> {
        let started = Instant::now();
        let fetched = match tokio::time::timeout(FETCH_TIMEOUT, self.fetcher.fetch()).await {
            Ok(r) => r,
            Err(_) => Err(format!("token request timed out after {FETCH_TIMEOUT:?}")),
        };
        self.fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match fetched {
            Ok((token, lifetime)) => {
                let ahead = REFRESH_AHEAD.min(lifetime / 2);
                let mut header = Vec::with_capacity(7 + token.expose_secret().len());
                header.extend_from_slice(b"Bearer ");
                header.extend_from_slice(token.expose_secret().as_bytes());
                let t = Arc::new(Token {
                    header: SecretSlice::from(header),
                    expires_at: started + lifetime,
                    refresh_at: started + lifetime - ahead,
                });
                self.current.store(Some(t.clone()));
                tracing::info!(
                    account = %self.account, key = %self.fingerprint, expires_in_s = lifetime.as_secs(),
                    "GCP access token minted"
                );
                self.start_refresher();
                Ok(t)
            }
            Err(e) => {
                tracing::warn!(account = %self.account, key = %self.fingerprint, error = %e, "GCP access token fetch failed");
                Err(e.into())
            }
        }
    }

    /// One background task per source refreshes the token ahead of expiry. It holds only a weak
    /// reference: when no snapshot uses the source any more, it ends.
    fn start_refresher(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.refresher.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.refresher.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            let mut retry = Duration::from_secs(1);
            loop {
                let Some(at) = weak.upgrade().and_then(|s| s.current.load_full()).map(|t| t.refresh_at) else {
                    return;
                };
                tokio::time::sleep_until(at).await;
                let Some(source) = weak.upgrade() else { return };
                let stale = source.current.load_full().is_some_and(|t| t.refresh_at <= Instant::now());
                if !stale {
                    continue;
                }
                if source.flight().await.is_ok() {
                    retry = Duration::from_secs(1);
                    continue;
                }
                drop(source);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        });
    }
}

/// The fields keyswap needs from a service-account key, checked at load time so that a broken
/// key is reported with its Secret and key instead of failing at the first request.
pub fn check_key(json: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("is not valid JSON: {e}"))?;
    let field = |name: &str| -> Result<&str, String> {
        v.get(name)
            .and_then(|x| x.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("is not a service-account key: field `{name}` is missing or not a string"))
    };
    if let Some(t) = v.get("type").and_then(|t| t.as_str()) {
        if t != "service_account" {
            return Err(format!("has type `{t}`; a service-account key (type `service_account`) is required"));
        }
    }
    let email = field("client_email")?;
    let key = field("private_key")?;
    let uri = field("token_uri")?;
    if !key.contains("-----BEGIN PRIVATE KEY-----") {
        return Err("field `private_key` is not a PKCS#8 PEM private key".into());
    }
    if !(uri.starts_with("https://") || uri.starts_with("http://")) {
        return Err(format!("field `token_uri` is not an http(s) URL: `{uri}`"));
    }
    Ok(email.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Counts calls; answers after `delay` with a token of `lifetime`, or fails while `down`.
    struct Counting {
        calls: Arc<AtomicU64>,
        down: Arc<AtomicBool>,
        lifetime: Duration,
        delay: Duration,
    }

    impl Fetch for Counting {
        fn fetch(&self) -> BoxFuture<Fetched> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let down = self.down.load(Ordering::SeqCst);
            let (lifetime, delay) = (self.lifetime, self.delay);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if down {
                    return Err("connection refused".into());
                }
                Ok((SecretString::from(format!("tok-{n}")), lifetime))
            })
        }
    }

    fn source(lifetime: Duration, delay: Duration) -> (Arc<TokenSource>, Arc<AtomicU64>, Arc<AtomicBool>) {
        let calls = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let f = Counting { calls: calls.clone(), down: down.clone(), lifetime, delay };
        (
            TokenSource::new(
                "sa@p.iam.gserviceaccount.com".into(),
                vec![DEFAULT_SCOPE.into()],
                "fp".into(),
                Box::new(f),
            ),
            calls,
            down,
        )
    }

    fn value(t: &Token) -> String {
        String::from_utf8(t.header.expose_secret().to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn many_concurrent_first_requests_make_one_fetch() {
        let (s, calls, _) = source(Duration::from_secs(3600), Duration::from_millis(200));
        assert!(s.cached().is_none());
        let waiters: Vec<_> = (0..100)
            .map(|_| {
                tokio::spawn({
                    let s = s.clone();
                    async move { s.token().await }
                })
            })
            .collect();
        for w in waiters {
            assert_eq!(value(&w.await.unwrap().unwrap()), "Bearer tok-1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(value(&s.cached().unwrap()), "Bearer tok-1");
    }

    #[tokio::test(start_paused = true)]
    async fn token_is_refreshed_in_the_background_before_it_expires() {
        let (s, calls, _) = source(Duration::from_secs(3600), Duration::from_millis(10));
        s.token().await.unwrap();
        // 54 minutes: still the first token, no second fetch.
        tokio::time::sleep(Duration::from_secs(54 * 60)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Past 55 minutes (5 minutes ahead of expiry) the refresher has fetched a new one, and
        // requests never waited: the old token was still valid meanwhile.
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(value(&s.cached().unwrap()), "Bearer tok-2");
        // And again an hour later.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(value(&s.cached().unwrap()), "Bearer tok-3");
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_not_cached_and_recovery_is_immediate() {
        let (s, calls, down) = source(Duration::from_secs(3600), Duration::from_millis(10));
        down.store(true, Ordering::SeqCst);
        assert!(s.token().await.unwrap_err().contains("connection refused"));
        assert!(s.cached().is_none());
        assert!(s.token().await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "each request after a failure tries again");
        down.store(false, Ordering::SeqCst);
        assert_eq!(value(&s.token().await.unwrap()), "Bearer tok-3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_endpoint_times_out() {
        let (s, _, _) = source(Duration::from_secs(3600), Duration::from_secs(3600));
        let err = s.token().await.unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_valid_token_and_retries() {
        let (s, calls, down) = source(Duration::from_secs(600), Duration::from_millis(10));
        s.token().await.unwrap();
        down.store(true, Ordering::SeqCst);
        // Refresh due at 5 minutes; it fails, the old token still serves.
        tokio::time::sleep(Duration::from_secs(301)).await;
        assert!(calls.load(Ordering::SeqCst) >= 2);
        assert_eq!(value(&s.cached().unwrap()), "Bearer tok-1");
        down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t = s.cached().unwrap();
        assert_ne!(value(&t), "Bearer tok-1");
    }

    /// The attack: a key file forged so that its 48-bit fingerprint (printed by `check`, logged
    /// on every mint) is another tenant's, put in a Secret a tenant template picks up. The cache
    /// of token sources took the fingerprint for the key, and handed over the victim's source.
    #[test]
    fn a_key_forged_to_share_a_fingerprint_never_gets_another_keys_token_source() {
        let scopes = vec![DEFAULT_SCOPE.to_owned()];
        let source = |json: &str, fp: &str| TokenSource::for_key(&json.into(), "a@b".into(), scopes.clone(), fp.into());
        let victim = source(r#"{"type":"service_account","k":"victim"}"#, "0123456789ab");
        let forged = source(r#"{"type":"service_account","k":"forged"}"#, "0123456789ab");
        assert!(!Arc::ptr_eq(&victim, &forged), "a forged key shares the victim's tokens");
        let again = source(r#"{"type":"service_account","k":"victim"}"#, "0123456789ab");
        assert!(Arc::ptr_eq(&victim, &again), "the same key and scopes share one source");
        let other_scopes = TokenSource::for_key(
            &r#"{"type":"service_account","k":"victim"}"#.into(),
            "a@b".into(),
            vec!["https://www.googleapis.com/auth/other".into()],
            "0123456789ab".into(),
        );
        assert!(!Arc::ptr_eq(&victim, &other_scopes));
    }

    #[test]
    fn key_check_names_what_is_wrong() {
        assert!(check_key("{").unwrap_err().contains("not valid JSON"));
        assert!(check_key(r#"{"type":"service_account"}"#).unwrap_err().contains("client_email"));
        assert!(check_key(r#"{"type":"authorized_user"}"#).unwrap_err().contains("authorized_user"));
        let ok = r#"{"type":"service_account","client_email":"a@b","private_key":"-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n","token_uri":"https://oauth2.googleapis.com/token"}"#;
        assert_eq!(check_key(ok).unwrap(), "a@b");
    }
}
