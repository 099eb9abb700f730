//! A fake Google OAuth token endpoint on loopback, speaking the JWT-bearer grant over real HTTP.
//!
//! It knows the public key of every service account it issued a key for, and verifies each
//! assertion's RS256 signature with `ring` (independently of the `gcp_auth` code that signed it),
//! plus `iss`, `aud` (its own token URI), `scope` and `exp`. Valid assertions get a short-lived
//! token `ya29.fake-N`. It can be taken down (connection refused) and brought back on the same port.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

pub struct FakeTokenEndpoint {
    pub port: u16,
    /// Token requests answered 200.
    pub issued: Arc<AtomicU64>,
    /// Token requests refused (bad assertion), with the reason.
    pub refused: Arc<Mutex<Vec<String>>>,
    /// `client_email` → PKCS#1 RSA public key (DER).
    keys: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    lifetime_s: u64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Token requests received (answered or not yet).
    pub asked: Arc<AtomicU64>,
    /// While true, token requests wait before they are answered (a slow token endpoint).
    held: tokio::sync::watch::Sender<bool>,
}

impl FakeTokenEndpoint {
    pub async fn start(lifetime_s: u64) -> Arc<FakeTokenEndpoint> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = Arc::new(FakeTokenEndpoint {
            port: listener.local_addr().unwrap().port(),
            issued: Arc::default(),
            refused: Arc::default(),
            keys: Arc::default(),
            lifetime_s,
            task: Mutex::new(None),
            asked: Arc::default(),
            held: tokio::sync::watch::Sender::new(false),
        });
        ep.serve(listener);
        ep
    }

    pub fn token_uri(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Stops listening: token requests get "connection refused".
    pub fn down(&self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }

    /// Token requests wait, unanswered, until [`FakeTokenEndpoint::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Answers the requests held and every later one at once.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Listens again on the same port.
    pub async fn up(self: &Arc<Self>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "rebind token endpoint: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }

    fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener) {
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let me = me.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(me.handle(req).await) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// A new service-account key for `email`, generated with openssl; returns the key JSON
    /// (what goes in the Secret) with this endpoint as `token_uri`.
    pub fn service_account(&self, dir: &Path, email: &str) -> String {
        let key = dir.join(format!("{email}.pem"));
        let der = dir.join(format!("{email}.pub.der"));
        let run = |args: &[&str]| {
            let o =
                Command::new("openssl").args(args).output().expect("openssl is installed (apt-get install -y openssl)");
            assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        };
        run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key.to_str().unwrap()]);
        run(&[
            "rsa",
            "-in",
            key.to_str().unwrap(),
            "-RSAPublicKey_out",
            "-outform",
            "DER",
            "-out",
            der.to_str().unwrap(),
        ]);
        self.keys.lock().unwrap().insert(email.to_owned(), std::fs::read(&der).unwrap());
        let pem = std::fs::read_to_string(&key).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "openssl wrote PKCS#8");
        serde_json::json!({
            "type": "service_account",
            "project_id": "keyswap-test",
            "private_key_id": "k1",
            "private_key": pem,
            "client_email": email,
            "client_id": "1",
            "token_uri": self.token_uri(),
        })
        .to_string()
    }

    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        self.asked.fetch_add(1, Ordering::SeqCst);
        let _ = self.held.subscribe().wait_for(|held| !held).await;
        let reply = |status: u16, v: serde_json::Value| {
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(v.to_string())))
                .unwrap()
        };
        if path != "/token" {
            return reply(404, serde_json::json!({"error": "not_found"}));
        }
        match self.check(&body) {
            Ok(()) => {
                let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
                reply(
                    200,
                    serde_json::json!({"access_token": format!("ya29.fake-{n}"), "expires_in": self.lifetime_s, "token_type": "Bearer"}),
                )
            }
            Err(reason) => {
                self.refused.lock().unwrap().push(reason.clone());
                reply(400, serde_json::json!({"error": "invalid_grant", "error_description": reason}))
            }
        }
    }

    fn check(&self, body: &[u8]) -> Result<(), String> {
        let form: HashMap<String, String> = String::from_utf8_lossy(body)
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| {
                let v = percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned();
                (k.to_owned(), v)
            })
            .collect();
        if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
            return Err(format!("grant_type {:?}", form.get("grant_type")));
        }
        let jwt = form.get("assertion").ok_or("no assertion")?;
        let parts: Vec<&str> = jwt.split('.').collect();
        let [h, p, sig] = parts.as_slice() else { return Err("assertion is not a JWS".into()) };
        // RFC 7515 says no padding; Google (and gcp_auth) accept and send it: be as lenient.
        let b64 = base64::engine::GeneralPurpose::new(
            &base64::alphabet::URL_SAFE,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let header: serde_json::Value =
            serde_json::from_slice(&b64.decode(h).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        if header["alg"] != "RS256" {
            return Err(format!("alg {}", header["alg"]));
        }
        let claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(p).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let iss = claims["iss"].as_str().ok_or("no iss")?;
        let key = self.keys.lock().unwrap().get(iss).cloned().ok_or(format!("unknown service account {iss}"))?;
        let signature = b64.decode(sig).map_err(|e| e.to_string())?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, key)
            .verify(format!("{h}.{p}").as_bytes(), &signature)
            .map_err(|_| "bad RS256 signature".to_owned())?;
        if claims["aud"] != self.token_uri().as_str() {
            return Err(format!("aud {}", claims["aud"]));
        }
        if claims["scope"] != "https://www.googleapis.com/auth/cloud-platform" {
            return Err(format!("scope {}", claims["scope"]));
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let exp = claims["exp"].as_i64().ok_or("no exp")?;
        if exp < now || exp > now + 3600 {
            return Err(format!("exp {exp} (now {now})"));
        }
        Ok(())
    }
}
