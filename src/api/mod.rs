//! The resources keyswap reads, as written by users (`keyswap.dev/v1alpha1` and core `v1/Secret`).
//!
//! These are the raw shapes: strict (`deny_unknown_fields`), never used on the request path.
//! `config::compile` validates them once into a [`crate::config::Snapshot`].

// `#[kube(printcolumn(type_ = …))]` repeats keys by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod budget;
pub use budget::*;

pub const GROUP: &str = "keyswap.dev";
pub const API_VERSION: &str = "keyswap.dev/v1alpha1";

/// The subset of Kubernetes object metadata keyswap uses. Other fields (uid, resourceVersion,
/// managedFields …) are accepted and ignored, so `kubectl get -o yaml` output loads as is.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

// === EgressGateway ===

/// An egress gateway: its listeners, default policy, allow list and telemetry.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "keyswap.dev",
    version = "v1alpha1",
    kind = "EgressGateway",
    namespaced,
    shortname = "egw",
    doc = "An egress gateway for AI agents: listeners, default policy, allow list and telemetry.",
    printcolumn(name = "Policy", type_ = "string", json_path = ".spec.defaultPolicy"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "!has(self.spec.budgetStore) || !has(self.spec.budgetStore.redis.secretRef.__namespace__)"
    )
    .message("budgetStore.redis.secretRef.namespace is not allowed: the Secret is read in the gateway's namespace")
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressGatewaySpec {
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    /// One per name (a name given twice is refused).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub otlp: Option<Otlp>,
    /// Hosts reachable without a route when the default policy is deny-all, tunnelled
    /// untouched: `host` opens port 443 alone, `host:PORT` that port, `host:*` every port
    /// (`*.example.com` stands for one DNS label).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Who may use the gateway: an ordered chain of validators (see docs/identity.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_auth: Option<AgentAuth>,
    /// Where `TokenBudget` counters live. Absent: in this process (one replica). With `redis`,
    /// every replica of the gateway shares them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_store: Option<BudgetStore>,
    /// Namespaces besides its own whose AIProviderRoutes may attach to this gateway (`*`: every
    /// namespace). Policies and budgets attach only within their own namespace, and the gateway's
    /// catch-all policy binds only routes of its own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// Which other namespaces' routes a gateway takes.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Vec<String>,
}

impl EgressGatewaySpec {
    /// Whether a route in `namespace` may attach to this gateway, which is in `own`.
    pub fn admits_routes_from(&self, own: &str, namespace: &str) -> bool {
        namespace == own
            || self.allowed_routes.as_ref().is_some_and(|a| a.namespaces.iter().any(|n| n == "*" || n == namespace))
    }
}

/// The shared counter store of a gateway's token budgets.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BudgetStore {
    pub redis: RedisStore,
}

/// A Redis (or Valkey) server, reached with a URL kept in a Secret: `redis://[user:password@]host:port/db`,
/// or `rediss://…` for TLS.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedisStore {
    /// A Secret in the gateway's namespace.
    pub secret_ref: SecretRef,
    /// The key holding the URL (default `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_key: Option<String>,
    /// A key of the same Secret holding the PEM CA that signs the server's certificate (`rediss://`
    /// with a private CA). Default: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<String>,
}

/// Agent admission: the first validator that accepts the agent's token admits the request; none
/// → 401.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentAuth {
    /// Admit requests that carry no token (or only the placeholder) as `anonymous` and count them,
    /// for rollout. A token that no validator accepts is refused either way.
    #[serde(default)]
    pub optional: bool,
    /// Tried in order. Each item sets exactly one validator type.
    pub validators: Vec<AgentValidator>,
    /// Tenants counted by name in `keyswap_agent_admissions_total`; others count as `other`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_tenants: Vec<String>,
}

/// One validator of the chain: set exactly one of `apiKeys`, `sharedToken`, `jwt`, `edgeTrust`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentValidator {
    /// Shown in spans as `keyswap.auth.validator` (default: the validator type); unique within
    /// the chain (budgets kept per agent count each validator's agents apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The tenants this validator's callers may name (names, or `*` globs such as `partner-*`):
    /// a caller it admits that names another (a JWT claim, an edge-trust header, an API key's
    /// Secret) is refused with 403 `tenant_not_allowed`. Empty: any tenant. Set it whenever
    /// another validator's agents have tenants, so this one's callers cannot take their keys or
    /// budgets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<ApiKeysValidator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_token: Option<SharedTokenValidator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtValidator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_trust: Option<EdgeTrustValidator>,
}

/// Signed tokens: RS256/ES256 with keys from a JWKS, or HS256 with a shared secret.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtValidator {
    /// Required `iss`.
    pub issuer: String,
    /// Accepted `aud` values; at least one (required).
    pub audiences: Vec<String>,
    /// Where RS256/ES256 keys come from: set `jwksFile` or `jwksUrl` (https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// How often a `jwksUrl` is refetched (an unknown `kid` refetches at once). Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_refresh_seconds: Option<u64>,
    /// HS256: the shared secret, from a Secret in the gateway's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_ref: Option<SecretRef>,
    /// Key of `hs256SecretRef` (default `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_key: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`, seconds. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leeway_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_mapping: Option<ClaimMapping>,
}

/// Claims that make the identity; each may be a string or an array of one string (an array of
/// several names no one: such a subject is refused, such a tenant is none); roles may be any
/// array, joined with `,`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimMapping {
    /// The agent (default `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// Identity headers set by a trusted hop (a mesh sidecar, an authenticating proxy), honoured
/// only when Envoy reports the connection as mTLS (`trustMtls`) or its source address lies in
/// `trustedCidrs`. They are removed from every request before it leaves, trusted or not.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EdgeTrustValidator {
    pub agent_header: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_header: Option<String>,
    /// Honour the headers on connections whose client certificate Envoy verified and
    /// `mtlsPeers` names.
    #[serde(default)]
    pub trust_mtls: bool,
    /// With `trustMtls` (required): the hop's client certificates, by their first URI SAN (a
    /// SPIFFE ID such as `spiffe://cluster.local/ns/edge/sa/authn-proxy`) or first DNS SAN; `*`
    /// globs. `["*"]` trusts any certificate Envoy verified (in a mesh, every workload's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mtls_peers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_cidrs: Vec<String>,
}

/// Per-agent tokens: Secrets in the gateway's namespace labelled `keyswap.dev/agent-token: "true"`
/// (what `keyswap token create` writes), each holding `sha256` (hex digest of the token),
/// `agent`, optional `tenant` and optional `expires` (RFC 3339). Deleting the Secret revokes.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiKeysValidator {}

/// One token shared by every caller, from a Secret in the gateway's namespace.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SharedTokenValidator {
    pub secret_ref: SecretRef,
    /// Default `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<String>,
    /// The identity callers get: agent name (default `shared`) and tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum DefaultPolicy {
    #[serde(rename = "allow-all")]
    AllowAll,
    #[default]
    #[serde(rename = "deny-all")]
    DenyAll,
}

impl DefaultPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllowAll => "allow-all",
            DefaultPolicy::DenyAll => "deny-all",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    pub protocol: ListenerProtocol,
    #[schemars(range(min = 1))]
    pub port: u16,
    #[serde(default)]
    pub tls: Option<ListenerTls>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum ListenerProtocol {
    Http,
    Https,
    Connect,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerTls {
    pub mode: TlsMode,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum TlsMode {
    Terminate,
    Passthrough,
}

#[derive(Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Otlp {
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub capture_body: Option<CaptureBody>,
    /// `false`: keyswap never asks Envoy for bodies for telemetry. Spans then carry headers only:
    /// no captured bodies, no token usage, no model read from JSON bodies; each request saves up
    /// to two ext_proc round trips. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bodies: Option<bool>,
}

/// Header values may authenticate to the collector: `Debug` shows names only.
impl std::fmt::Debug for Otlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otlp")
            .field("endpoint", &self.endpoint)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("capture_body", &self.capture_body)
            .field("read_bodies", &self.read_bodies)
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaptureBody {
    /// Bytes of each request and response body a span captures (base64 events, content
    /// attributes).
    // `maximum` in the schema: the API server enforces no `format`, and a value a u32 cannot
    // hold would leave the object undecodable.
    #[serde(default)]
    #[schemars(range(max = 4_294_967_295u32))]
    pub max_bytes: Option<u32>,
    #[serde(default)]
    pub include_content_types: Vec<String>,
}

// === AIProviderRoute ===

/// Which AI-provider requests a gateway routes: provider, hosts, endpoints, models.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "keyswap.dev",
    version = "v1alpha1",
    kind = "AIProviderRoute",
    namespaced,
    shortname = "aipr",
    status = "ResourceStatus",
    doc = "Routes AI-provider requests through an EgressGateway.",
    printcolumn(name = "Accepted", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(
        name = "Resolved",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"ResolvedRefs\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AIProviderRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub rules: Vec<RouteRule>,
    /// Also scrub live secret values from response bodies and trailers before the agent sees
    /// them (response headers are always scrubbed). Costs one ext_proc round trip per response
    /// chunk. Default:
    /// on for `custom` providers (an unknown upstream may echo what it received), off for the
    /// known providers (they never echo credentials in bodies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub_response_bodies: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    pub matches: Vec<RouteMatch>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    pub provider: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path globs; empty matches every path on the hosts.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Model globs; empty matches every model.
    #[serde(default)]
    pub models: Vec<String>,
}

// === CredentialInjectionPolicy ===

/// Which Secret key is injected into a route's requests, and how.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, kube::KubeSchema)]
#[kube(
    group = "keyswap.dev",
    version = "v1alpha1",
    kind = "CredentialInjectionPolicy",
    namespaced,
    shortname = "cip",
    status = "ResourceStatus",
    doc = "Injects a Secret's key into the requests of an AIProviderRoute (or of every route in its gateway's namespace that has no policy of its own).",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".spec.secretRef.name"),
    printcolumn(
        name = "Resolved",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"ResolvedRefs\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.target != 'ProviderAuth' || has(self.spec.providerAuth)")
        .message("providerAuth is required when target is ProviderAuth"),
    validation = Rule::new("self.spec.target == 'Header' || (!has(self.spec.headerName) && !has(self.spec.valuePrefix))")
        .message("headerName and valuePrefix apply only to target Header"),
    validation = Rule::new("self.spec.target == 'QueryParam' || !has(self.spec.queryParamName)")
        .message("queryParamName applies only to target QueryParam"),
    validation = Rule::new("!has(self.spec.secretRef.__namespace__)")
        .message("secretRef.namespace is not allowed: a policy reads Secrets only in its own namespace")
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CredentialInjectionPolicySpec {
    pub parent_refs: Vec<ParentRef>,
    pub secret_ref: SecretRef,
    #[serde(default)]
    pub secret_key: Option<String>,
    pub target: Target,
    #[serde(default)]
    pub header_name: Option<String>,
    #[serde(default)]
    pub value_prefix: Option<String>,
    #[serde(default)]
    pub query_param_name: Option<String>,
    #[serde(default)]
    pub provider_auth: Option<ProviderAuth>,
    /// Bring your own key: the Secret is chosen by the caller's tenant (`spec.agentAuth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_selector: Option<CredentialSelector>,
    /// Headers written on every request this policy injects, overwriting the agent's: the
    /// organization or project the key is used in (`openai-organization`, `openai-project`,
    /// `x-goog-user-project`, which are otherwise removed). Values are not secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set_headers: Vec<SetHeader>,
}

/// One header a policy writes (Gateway API's `HTTPHeader` shape).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SetHeader {
    pub name: String,
    pub value: String,
}

/// Per-tenant credentials. A tenant listed in `byTenant.tenants` uses that Secret; otherwise
/// `secretNameTemplate` names it; a tenant with neither (or an anonymous caller) gets
/// `fallback`: `Deny` (403, the default) or `Default` (the policy's own `secretRef`).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CredentialSelector {
    pub by_tenant: ByTenant,
    #[serde(default)]
    pub fallback: TenantFallback,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ByTenant {
    /// A Secret name with `{tenant}` in it, e.g. `{tenant}-anthropic`; the key is the policy's
    /// `secretKey`. Only Secrets in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name_template: Option<String>,
    /// Explicit tenant → Secret, used before the template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, TenantSecret>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TenantSecret {
    pub secret_ref: SecretRef,
    /// Default: the policy's `secretKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum TenantFallback {
    #[default]
    Deny,
    Default,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretRef {
    pub name: String,
    /// Present only so that it can be refused with a clear message: a policy reads Secrets
    /// in its own namespace, never another team's.
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Target {
    Header,
    QueryParam,
    ProviderAuth,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderAuth {
    #[serde(rename = "type")]
    pub kind: ProviderAuthType,
    /// AWSv4: the signing region (default: from the host, `bedrock-runtime.<region>.amazonaws.com`).
    #[serde(default)]
    pub region: Option<String>,
    /// AWSv4: the signing name (default: `bedrock` for Bedrock hosts, else the host's first label).
    #[serde(default)]
    pub service: Option<String>,
    /// OAuth scopes for GCPServiceAccount (default `https://www.googleapis.com/auth/cloud-platform`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ProviderAuthType {
    AWSv4,
    GCPServiceAccount,
}

/// Status written with `--write-status`: `Accepted` and `ResolvedRefs` conditions.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub last_transition_time: Option<String>,
    #[serde(default)]
    pub observed_generation: Option<i64>,
}

/// The CustomResourceDefinitions, as YAML documents (what `keyswap crds` prints).
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt as _;
    let crds = [EgressGateway::crd(), AIProviderRoute::crd(), CredentialInjectionPolicy::crd(), TokenBudget::crd()];
    crds.iter().map(|c| serde_yaml_ng::to_string(c).expect("CRDs serialize")).collect::<Vec<_>>().join("---\n")
}
