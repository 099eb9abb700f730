//! The gateway's certificates: a per-gateway CA the agents trust, and a short-lived leaf with a
//! SAN for every host the gateway's routes match, which Envoy presents when it terminates TLS.
//!
//! Layout of `DIR` (default `certs/<gateway>/`):
//! `ca.crt` (give it to agents), `ca.key` (0600, never logged), `leaf.crt` (leaf + CA chain),
//! `leaf.key` (0600), `leaf.json` (hosts and expiry, to know when to re-mint).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::vocab::Key;

/// How long a leaf lives, and how long before expiry it is replaced.
#[derive(Clone, Copy, Debug)]
pub struct LeafPolicy {
    pub validity: Duration,
    pub renew_before: Duration,
}

impl Default for LeafPolicy {
    fn default() -> Self {
        LeafPolicy { validity: Duration::from_secs(7 * 24 * 3600), renew_before: Duration::from_secs(2 * 24 * 3600) }
    }
}

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The io error is part of the message, not a `source`: printed as a chain it would repeat.
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("gateway CA from {origin}: {reason}")]
    BadCa { origin: String, reason: String },
    #[error("no host of gateway {0} can be put in a certificate; list explicit hosts in its routes")]
    NoHosts(Key),
}

/// What [`ensure`] found or made.
#[derive(Debug)]
pub struct GatewayCerts {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub leaf_cert: PathBuf,
    pub leaf_key: PathBuf,
    /// The SANs of the leaf.
    pub hosts: Vec<String>,
    pub leaf_not_after: OffsetDateTime,
    pub ca_created: bool,
    pub leaf_minted: bool,
    /// Host patterns no certificate can carry (a `*` that is not the leftmost label).
    pub skipped: Vec<String>,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct LeafMeta {
    hosts: Vec<String>,
    not_after: i64,
}

/// Splits route hosts into those a certificate can name (exact, or `*.` leftmost wildcard) and
/// the rest.
pub fn certifiable(hosts: impl IntoIterator<Item = String>) -> (Vec<String>, Vec<String>) {
    let (mut ok, mut skipped) = (Vec::new(), Vec::new());
    for h in hosts {
        let rest = h.strip_prefix("*.").unwrap_or(&h);
        if rest.contains('*') {
            skipped.push(h);
        } else if !ok.contains(&h) {
            ok.push(h);
        }
    }
    ok.sort();
    (ok, skipped)
}

/// Creates the gateway CA in `dir` (`ca.crt`, and `ca.key` readable by its owner only) unless
/// both files exist. Returns whether it created one. One file without the other is an error,
/// never a new CA over it: a `ca.key` restored from a vault would be overwritten, and every
/// agent that trusts the old `ca.crt` cut off.
pub fn ensure_ca(dir: &Path, gateway: &Key, now: OffsetDateTime) -> Result<bool, CertError> {
    std::fs::create_dir_all(dir).map_err(|cause| CertError::Io { path: dir.to_path_buf(), cause })?;
    let (ca_cert, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    match (ca_key.exists(), ca_cert.exists()) {
        (true, true) => return Ok(false),
        (false, false) => {}
        (key, _) => {
            let (there, missing) = if key { ("ca.key", "ca.crt") } else { ("ca.crt", "ca.key") };
            return Err(CertError::BadCa {
                origin: dir.display().to_string(),
                reason: format!(
                    "{there} is there but {missing} is not: restore {missing}, or remove {there} to create a \
                     new CA (agents that trust the old ca.crt must then be given the new one)"
                ),
            });
        }
    }
    let key = KeyPair::generate()?;
    let cert = ca_params(gateway, now).self_signed(&key)?;
    write_private(&ca_key, key.serialize_pem().as_bytes())?;
    write_public(&ca_cert, cert.pem().as_bytes())?;
    tracing::info!(gateway = %gateway, path = %ca_cert.display(), "created gateway CA");
    Ok(true)
}

/// Creates or reuses the CA, and re-mints the leaf when it is missing, names other hosts, or
/// expires within `policy.renew_before` of `now`.
pub fn ensure(
    dir: &Path,
    gateway: &Key,
    hosts: Vec<String>,
    now: OffsetDateTime,
    policy: LeafPolicy,
) -> Result<GatewayCerts, CertError> {
    let (hosts, skipped) = certifiable(hosts);
    if hosts.is_empty() {
        return Err(CertError::NoHosts(gateway.clone()));
    }
    let ca_created = ensure_ca(dir, gateway, now)?;
    let ca_cert = dir.join("ca.crt");
    let (leaf_cert, leaf_key, meta_path) = (dir.join("leaf.crt"), dir.join("leaf.key"), dir.join("leaf.json"));

    let existing: Option<LeafMeta> = std::fs::read(&meta_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let renew_at = |not_after: i64| not_after - policy.renew_before.as_secs() as i64;
    let reusable = !ca_created
        && leaf_cert.exists()
        && leaf_key.exists()
        && existing.as_ref().is_some_and(|m| m.hosts == hosts && now.unix_timestamp() < renew_at(m.not_after));
    if let (true, Some(meta)) = (reusable, &existing) {
        let not_after = OffsetDateTime::from_unix_timestamp(meta.not_after).unwrap_or(now);
        return Ok(GatewayCerts {
            dir: dir.to_path_buf(),
            ca_cert,
            leaf_cert,
            leaf_key,
            hosts,
            leaf_not_after: not_after,
            ca_created,
            leaf_minted: false,
            skipped,
        });
    }

    let leaf = Ca::load(dir)?.mint(&hosts, now, policy.validity)?;
    write_private(&leaf_key, leaf.key_pem.expose_secret().as_bytes())?;
    write_public(&leaf_cert, leaf.chain_pem.as_bytes())?;
    let meta = LeafMeta { hosts: hosts.clone(), not_after: leaf.not_after.unix_timestamp() };
    write_public(&meta_path, &serde_json::to_vec_pretty(&meta).unwrap_or_default())?;
    let reason = match &existing {
        None => "no leaf yet",
        Some(m) if m.hosts != hosts => "route hosts changed",
        Some(_) if ca_created => "new CA",
        Some(_) => "leaf near expiry",
    };
    tracing::info!(gateway = %gateway, hosts = ?hosts, not_after = %leaf.not_after, reason, "minted gateway leaf certificate");
    Ok(GatewayCerts {
        dir: dir.to_path_buf(),
        ca_cert,
        leaf_cert,
        leaf_key,
        hosts,
        leaf_not_after: leaf.not_after,
        ca_created,
        leaf_minted: true,
        skipped,
    })
}

/// A gateway CA ready to sign: its certificate (what agents trust) and its private key, which
/// never leaves the process: no `Debug` or `Display` shows it, and it is never written anywhere.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
    fingerprint: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("sha256", &self.fingerprint).field("not_after", &self.not_after).finish()
    }
}

impl Ca {
    /// A CA from PEM: the certificate (the first one, when a chain is given) and its key, PKCS#8
    /// (`keyswap certs`; cert-manager with `privateKey.encoding: PKCS8`) or PKCS#1 RSA. `origin`
    /// names where they came from, for errors.
    pub fn from_pem(cert_pem: &str, key_pem: &str, origin: &str) -> Result<Ca, CertError> {
        let bad = |reason: String| CertError::BadCa { origin: origin.to_owned(), reason };
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            let hint = if key_pem.contains("BEGIN EC PRIVATE KEY") {
                " (an SEC1 EC key: give it as PKCS#8, e.g. cert-manager's privateKey.encoding: PKCS8, \
                 or `openssl pkcs8 -topk8 -nocrypt`)"
            } else {
                " (expected a PKCS#8 or PKCS#1 RSA PEM key)"
            };
            bad(format!("private key: {e}{hint}"))
        })?;
        let der = rustls_pem_first_cert(cert_pem).ok_or_else(|| bad("no PEM CERTIFICATE block".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(format!("certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(bad("the certificate is not a CA (basicConstraints CA:TRUE missing)".into()));
        }
        let cert_key = parsed.public_key().subject_public_key.data.as_ref();
        if cert_key != key.public_key_raw() {
            return Err(bad("the private key does not belong to the certificate".into()));
        }
        let not_after = OffsetDateTime::from_unix_timestamp(parsed.validity().not_after.timestamp())
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let fingerprint = crate::vocab::fingerprint(&der);
        let issuer = Issuer::from_ca_cert_der(&der.into(), key).map_err(|e| bad(format!("certificate: {e}")))?;
        Ok(Ca { cert_pem: cert_pem.to_owned(), issuer, not_after, fingerprint })
    }

    /// `ca.crt` and `ca.key` in `dir`, as `keyswap certs` writes them.
    pub fn load(dir: &Path) -> Result<Ca, CertError> {
        let cert = read(&dir.join("ca.crt"))?;
        let key_path = dir.join("ca.key");
        let key = read(&key_path)?;
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(&key_path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %key_path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "the gateway CA's key is readable by others than its owner: whoever reads it can mint certificates agents trust (chmod 600)");
            }
        }
        Ca::from_pem(&cert, &key, &dir.display().to_string())
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A short SHA-256 fingerprint of the certificate, for logs.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// A new leaf (fresh key) naming `hosts`, valid from an hour ago (clock skew) for `validity`
    /// from `now`; its chain is the leaf then this CA. With no host, it names `keyswap.invalid`
    /// (a gateway without routes still needs a certificate for Envoy to start its listeners).
    pub fn mint(&self, hosts: &[String], now: OffsetDateTime, validity: Duration) -> Result<Leaf, CertError> {
        let placeholder = ["keyswap.invalid".to_owned()];
        let names = if hosts.is_empty() { &placeholder[..] } else { hosts };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, names[0].clone());
        params.distinguished_name.push(DnType::OrganizationName, "keyswap gateway");
        params.subject_alt_names =
            names.iter().map(|h| h.clone().try_into().map(SanType::DnsName)).collect::<Result<Vec<_>, _>>()?;
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::seconds(validity.as_secs() as i64);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain_pem = cert.pem();
        if !chain_pem.ends_with('\n') {
            chain_pem.push('\n');
        }
        chain_pem.push_str(&self.cert_pem);
        Ok(Leaf { chain_pem, key_pem: key.serialize_pem().into(), hosts: hosts.to_vec(), not_after: params.not_after })
    }
}

/// The DER of the first `CERTIFICATE` block of `pem`.
fn rustls_pem_first_cert(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok().map(|c| c.to_vec())
}

/// The gateway CA as it stands: replaced when its files or Secret change; `None` while there is
/// none (routed hosts then fail TLS, closed).
pub type CaCell = std::sync::Arc<arc_swap::ArcSwapOption<Ca>>;

/// Follows `ca.crt` and `ca.key` in `dir` (checked every second): a CA that loads replaces the
/// current one; one that does not is logged and the current one stays.
pub fn watch_dir(dir: PathBuf, cell: CaCell) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let stamp = |f: &str| std::fs::metadata(dir.join(f)).ok().map(|m| (m.modified().ok(), m.len()));
        let mut seen = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = (stamp("ca.crt"), stamp("ca.key"));
            if seen.as_ref() == Some(&now) {
                continue;
            }
            let first = seen.is_none();
            seen = Some(now);
            match Ca::load(&dir) {
                Ok(ca) => {
                    tracing::info!(dir = %dir.display(), ca = %ca.fingerprint(), not_after = %ca.not_after(), "loaded the gateway CA");
                    cell.store(Some(std::sync::Arc::new(ca)));
                }
                Err(CertError::Io { cause, .. }) if first && cause.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(dir = %dir.display(), "no gateway CA (ca.crt, ca.key) yet: create one with `keyswap certs`; until then Envoy gets no leaf certificate over ADS (a static bootstrap does not need it)");
                }
                Err(e) => tracing::error!(error = %e, "cannot load the gateway CA; keeping the current one"),
            }
        }
    })
}

/// A leaf certificate minted in memory: what Envoy presents for the routed hosts.
#[derive(Debug)]
pub struct Leaf {
    /// The leaf, then the CA.
    pub chain_pem: String,
    pub key_pem: secrecy::SecretString,
    pub hosts: Vec<String>,
    pub not_after: OffsetDateTime,
}

/// The CA's parameters. Rebuilt identically from the gateway name each time, so a reused CA key
/// signs leaves whose issuer matches the `ca.crt` written when it was created.
fn ca_params(gateway: &Key, now: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, format!("keyswap gateway CA {gateway}"));
    p.distinguished_name.push(DnType::OrganizationName, "keyswap");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::seconds(CA_VALIDITY.as_secs() as i64);
    p
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|cause| CertError::Io { path: path.to_path_buf(), cause })
}

/// Writes through a temporary file and a rename, so Envoy never reads half a file.
fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let io = |cause| CertError::Io { path: path.to_path_buf(), cause };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    write_with_mode(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    write_with_mode(path, bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn gw() -> Key {
        Key::new("default", "egress")
    }

    /// The gateway CA's key restored from a vault, its `ca.crt` not yet: a new CA was written over
    /// the key, and every agent that trusts the old `ca.crt` was cut off. Now it is an error.
    #[test]
    fn a_lone_ca_key_or_certificate_is_never_replaced_by_a_new_ca() {
        let now = OffsetDateTime::now_utc();
        for lone in ["ca.key", "ca.crt"] {
            let dir = tempfile::tempdir().unwrap();
            assert!(ensure_ca(dir.path(), &gw(), now).unwrap());
            let kept = std::fs::read(dir.path().join(lone)).unwrap();
            let other = if lone == "ca.key" { "ca.crt" } else { "ca.key" };
            std::fs::remove_file(dir.path().join(other)).unwrap();
            let e = ensure_ca(dir.path(), &gw(), now).unwrap_err().to_string();
            assert!(e.contains(&format!("{lone} is there but {other} is not")), "{e}");
            assert_eq!(std::fs::read(dir.path().join(lone)).unwrap(), kept, "{lone} was overwritten");
            assert!(!dir.path().join(other).exists());
        }
    }

    #[test]
    fn certifiable_hosts_keep_leftmost_wildcards_only() {
        let (ok, skipped) = certifiable(
            ["api.openai.com", "*.openai.azure.com", "bedrock-runtime.*.amazonaws.com", "api.openai.com"]
                .map(String::from),
        );
        assert_eq!(ok, ["*.openai.azure.com", "api.openai.com"]);
        assert_eq!(skipped, ["bedrock-runtime.*.amazonaws.com"]);
    }

    #[test]
    fn ca_is_reused_leaf_is_reminted_on_host_change_and_before_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = OffsetDateTime::now_utc();
        let p = LeafPolicy::default();
        let hosts = vec!["api.anthropic.com".to_string()];
        let first = ensure(dir.path(), &gw(), hosts.clone(), t0, p).unwrap();
        assert!(first.ca_created && first.leaf_minted);
        let mode = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("leaf.key"), 0o600);
        assert_eq!(mode("ca.crt"), 0o644);
        let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();

        let again = ensure(dir.path(), &gw(), hosts.clone(), t0 + time::Duration::days(1), p).unwrap();
        assert!(!again.ca_created && !again.leaf_minted, "fresh leaf reused");

        let near_expiry = ensure(dir.path(), &gw(), hosts.clone(), t0 + time::Duration::days(6), p).unwrap();
        assert!(near_expiry.leaf_minted, "leaf renewed before expiry");
        assert!(near_expiry.leaf_not_after > first.leaf_not_after);

        let more = vec!["api.anthropic.com".to_string(), "api.openai.com".to_string()];
        let changed = ensure(dir.path(), &gw(), more, t0 + time::Duration::days(6), p).unwrap();
        assert!(changed.leaf_minted, "routes changed: new leaf");
        assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), ca, "CA unchanged");
    }

    #[test]
    fn a_ca_loads_mints_leaves_and_refuses_what_is_not_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let t0 = OffsetDateTime::now_utc();
        assert!(ensure_ca(dir.path(), &gw(), t0).unwrap());
        assert!(!ensure_ca(dir.path(), &gw(), t0).unwrap(), "an existing CA is kept");
        ensure_ca(other.path(), &gw(), t0).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let hosts = vec!["api.anthropic.com".to_owned(), "*.openai.azure.com".to_owned()];
        let leaf = ca.mint(&hosts, t0, Duration::from_secs(30)).unwrap();
        assert_eq!(leaf.chain_pem.matches("BEGIN CERTIFICATE").count(), 2, "leaf then CA");
        assert!(leaf.chain_pem.ends_with(ca.cert_pem()));
        assert_eq!(leaf.not_after.unix_timestamp(), (t0 + time::Duration::seconds(30)).unix_timestamp());
        let again = ca.mint(&hosts, t0, Duration::from_secs(30)).unwrap();
        assert_ne!(leaf.chain_pem, again.chain_pem, "every leaf is new (key and serial)");
        assert!(ca.mint(&[], t0, Duration::from_secs(30)).is_ok(), "no host: a placeholder name");

        let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        let key = read(dir.path(), "ca.key");
        let secret_lines: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
        let no_key_in = |text: &str| secret_lines.iter().all(|l| !text.contains(l));
        assert!(no_key_in(&format!("{ca:?} {leaf:?}")), "Debug shows key material");
        // Another CA's key, a leaf as the CA, junk: refused, saying why, never quoting the key.
        let cases = [
            (read(dir.path(), "ca.crt"), read(other.path(), "ca.key"), "does not belong"),
            (leaf.chain_pem.clone(), key.clone(), "not a CA"),
            ("junk".to_owned(), key.clone(), "no PEM CERTIFICATE"),
            (read(dir.path(), "ca.crt"), "junk".to_owned(), "private key"),
        ];
        for (cert, k, want) in cases {
            let e = Ca::from_pem(&cert, &k, "test").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(no_key_in(&e), "{e}");
        }
        let io = anyhow::Error::from(Ca::load(&dir.path().join("missing")).unwrap_err());
        assert_eq!(format!("{io:#}").matches("No such file").count(), 1, "{io:#}");
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n";
        let e = Ca::from_pem(&read(dir.path(), "ca.crt"), sec1, "test").unwrap_err().to_string();
        assert!(e.contains("PKCS#8"), "{e}");
    }
}
