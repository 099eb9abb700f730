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
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a usable private key ({reason})")]
    BadKey { path: PathBuf, reason: String },
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
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
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_path_buf(), source })?;
    let ca_cert = dir.join("ca.crt");
    let ca_key_path = dir.join("ca.key");
    let (leaf_cert, leaf_key, meta_path) = (dir.join("leaf.crt"), dir.join("leaf.key"), dir.join("leaf.json"));

    let ca_params = ca_params(gateway, now);
    let (ca_key, ca_created) = if ca_key_path.exists() && ca_cert.exists() {
        let pem = read(&ca_key_path)?;
        let key = KeyPair::from_pem(&pem)
            .map_err(|e| CertError::BadKey { path: ca_key_path.clone(), reason: e.to_string() })?;
        (key, false)
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params.self_signed(&key)?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
        write_public(&ca_cert, cert.pem().as_bytes())?;
        tracing::info!(gateway = %gateway, path = %ca_cert.display(), "created gateway CA");
        (key, true)
    };

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

    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, hosts[0].clone());
    params.distinguished_name.push(DnType::OrganizationName, "keyswap gateway");
    params.subject_alt_names =
        hosts.iter().map(|h| h.clone().try_into().map(SanType::DnsName)).collect::<Result<Vec<_>, _>>()?;
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::seconds(policy.validity.as_secs() as i64);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let ca_pem = read(&ca_cert)?;
    write_private(&leaf_key, key.serialize_pem().as_bytes())?;
    write_public(&leaf_cert, format!("{}{}", cert.pem(), ca_pem).as_bytes())?;
    let meta = LeafMeta { hosts: hosts.clone(), not_after: params.not_after.unix_timestamp() };
    write_public(&meta_path, &serde_json::to_vec_pretty(&meta).unwrap_or_default())?;
    let reason = match &existing {
        None => "no leaf yet",
        Some(m) if m.hosts != hosts => "route hosts changed",
        Some(_) if ca_created => "new CA",
        Some(_) => "leaf near expiry",
    };
    tracing::info!(gateway = %gateway, hosts = ?hosts, not_after = %params.not_after, reason, "minted gateway leaf certificate");
    Ok(GatewayCerts {
        dir: dir.to_path_buf(),
        ca_cert,
        leaf_cert,
        leaf_key,
        hosts,
        leaf_not_after: params.not_after,
        ca_created,
        leaf_minted: true,
        skipped,
    })
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
    std::fs::read_to_string(path).map_err(|source| CertError::Io { path: path.to_path_buf(), source })
}

/// Writes through a temporary file and a rename, so Envoy never reads half a file.
fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let io = |source| CertError::Io { path: path.to_path_buf(), source };
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
}
