//! Tests of the compile: validation messages, bindings and what fails closed, through manifests.

use super::*;
use crate::config::load::parse_file;
use crate::config::snapshot::{Credential, Unresolved};
use crate::config::Decision;

const GW: &str = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec: {}\n---\n";

fn route(name: &str, matches: &str) -> String {
    format!("apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{matches}]}}]\n---\n")
}

fn policy(name: &str, parent: &str, rest: &str) -> String {
    format!("apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{parent}]\n  secretRef: {{name: s}}\n{rest}\n---\n")
}

fn compile(text: &str) -> Result<Snapshot, String> {
    let (objs, errs) = parse_file(std::path::Path::new("t.yaml"), text);
    assert!(errs.is_empty(), "{errs:?}");
    let cat = Catalog::build(objs).map_err(|e| e.to_string())?;
    cat.compile(&Key::new("default", "egress")).map_err(|e| e.to_string())
}

#[test]
fn policy_conflicts_and_bad_references_are_errors() {
    let two = format!(
        "{GW}{}{}{}",
        route("r", "{provider: openai}"),
        policy("a", "{name: r}", "  target: Header"),
        policy("b", "{name: r}", "  target: Header")
    );
    let e = compile(&two).unwrap_err();
    assert!(e.contains("more than one CredentialInjectionPolicy targets this route: default/a, default/b"), "{e}");

    let dangling = format!("{GW}{}", policy("a", "{name: nope}", "  target: Header"));
    let e = compile(&dangling).unwrap_err();
    assert!(e.contains("field `spec.parentRefs[0]`: AIProviderRoute default/nope does not exist"), "{e}");

    let wrong_kind = format!("{GW}{}", policy("a", "{kind: Secret, name: s}", "  target: Header"));
    assert!(compile(&wrong_kind).unwrap_err().contains("unknown kind `Secret`"));
}

#[test]
fn set_headers_are_validated_by_name_and_never_echo_a_bad_value() {
    let with = |rest: &str| {
        format!("{GW}{}{}{}", route("r", "{provider: openai}"), policy("a", "{name: r}", rest), secret("  token: k"))
    };
    let ok = with("  target: Header\n  setHeaders: [{name: OpenAI-Organization, value: org-operator}]");
    let snap = compile(&ok).unwrap();
    let pinned = &snap.routes.entries[0].binding.strip.pinned;
    assert_eq!(&pinned[..], &[("openai-organization".into(), "org-operator".into())]);
    // A gateway's key in front of the provider (the agent's copy is stripped as a credential).
    let gateway_key = with("  target: Header\n  setHeaders: [{name: Helicone-Auth, value: Bearer sk-helicone-0001}]");
    let snap = compile(&gateway_key).unwrap();
    assert_eq!(snap.routes.entries[0].binding.strip.pinned[0].0.as_ref(), "helicone-auth");
    // Never the policy's own header: the pinned value would overwrite the key.
    let own = with("  target: Header\n  headerName: helicone-auth\n  setHeaders: [{name: Helicone-Auth, value: x}]");
    assert!(compile(&own).unwrap_err().contains("carries a credential"));
    for (rest, field, says) in [
        ("[{name: authorization, value: x}]", "spec.setHeaders[0].name", "carries a credential"),
        ("[{name: X_Api_Key, value: x}]", "spec.setHeaders[0].name", "carries a credential"),
        ("[{name: x-envoy-retry-on, value: x}]", "spec.setHeaders[0].name", "belongs to Envoy"),
        ("[{name: X-Amz-Date, value: x}]", "spec.setHeaders[0].name", "belongs to Envoy"),
        ("[{name: host, value: x}]", "spec.setHeaders[0].name", "Envoy manages it"),
        ("[{name: Content-Type, value: x}]", "spec.setHeaders[0].name", "belongs to Envoy, SigV4 or keyswap"),
        ("[{name: X-HTTP-Method-Override, value: x}]", "spec.setHeaders[0].name", "belongs to Envoy"),
        // Removed by the generated routes on the way, or refused on every request (400).
        ("[{name: X-Real-IP, value: 10.0.0.1}]", "spec.setHeaders[0].name", "belongs to Envoy"),
        ("[{name: Forwarded, value: for=x}]", "spec.setHeaders[0].name", "belongs to Envoy"),
        ("[{name: True-Client-IP, value: x}]", "spec.setHeaders[0].name", "belongs to Envoy"),
        ("[{name: X-Original-URL, value: /v1/x}]", "spec.setHeaders[0].name", "belongs to Envoy"),
        ("[{name: OpenAI_Organization, value: x}]", "spec.setHeaders[0].name", "write `-`"),
        ("[{name: ':path', value: x}]", "spec.setHeaders[0].name", "not a valid HTTP header name"),
        ("[{name: 'sk-pasted/key=', value: x}]", "spec.setHeaders[0].name", "not a valid HTTP header name"),
        ("[{name: a, value: x}, {name: A, value: y}]", "spec.setHeaders[1].name", "is set twice"),
        ("[{name: a, value: \"sk-pasted\\nkey\"}]", "spec.setHeaders[0].value", "no control characters"),
        ("[{name: a, value: ''}]", "spec.setHeaders[0].value", "1 to 1024 bytes"),
    ] {
        let e = compile(&with(&format!("  target: Header\n  setHeaders: {rest}"))).unwrap_err();
        assert!(
            e.contains("CredentialInjectionPolicy default/a") && e.contains(field) && e.contains(says),
            "{rest}: {e}"
        );
        assert!(!e.contains("sk-pasted"), "a bad value was echoed: {e}");
    }
}

#[test]
fn provider_specific_requirements_are_checked() {
    let custom = format!(
        "{GW}{}{}",
        route("r", "{provider: custom, hosts: [x.test]}"),
        policy("a", "{name: r}", "  target: Header")
    );
    let e = compile(&custom).unwrap_err();
    assert!(
        e.contains("CredentialInjectionPolicy default/a: field `spec.headerName`: is required: provider `custom` has no default header (route default/r rule 0 match 0)"),
        "{e}"
    );

    let no_hosts = format!("{GW}{}", route("r", "{provider: custom}"));
    assert!(compile(&no_hosts).unwrap_err().contains("provider `custom` has no default hosts"));

    let models = format!("{GW}{}", route("r", "{provider: openai, models: [gpt-4o]}"));
    assert!(compile(&models).unwrap_err().contains("sends the model in the request body"));

    let no_auth =
        format!("{GW}{}{}", route("r", "{provider: bedrock}"), policy("a", "{name: r}", "  target: ProviderAuth"));
    let e = compile(&no_auth).unwrap_err();
    assert!(e.contains("field `spec.providerAuth`: is required when target is ProviderAuth"), "{e}");

    let aws_key = format!(
        "{GW}{}{}",
        route("r", "{provider: bedrock}"),
        policy(
            "a",
            "{name: r}",
            "  target: ProviderAuth\n  secretKey: token\n  providerAuth: {type: AWSv4, scopes: [x]}"
        )
    );
    let e = compile(&aws_key).unwrap_err();
    assert!(
        e.contains("field `spec.secretKey`: does not apply to AWSv4: the Secret holds the keys `AWS_ACCESS_KEY_ID`"),
        "{e}"
    );
    assert!(e.contains("field `spec.providerAuth.scopes`: applies only to type GCPServiceAccount"), "{e}");

    let gcp_region = format!(
        "{GW}{}{}",
        route("r", "{provider: google}"),
        policy(
            "a",
            "{name: r}",
            "  target: ProviderAuth\n  providerAuth: {type: GCPServiceAccount, region: us-east-1}"
        )
    );
    assert!(compile(&gcp_region).unwrap_err().contains("region and service apply only to type AWSv4"));

    let header = format!(
        "{GW}{}{}",
        route("r", "{provider: openai}"),
        policy("a", "{name: r}", "  target: Header\n  headerName: \"bad header\"")
    );
    assert!(compile(&header).unwrap_err().contains("is not a valid HTTP header name"));
}

/// Secrets `name` holding the token `sk-{owner}-0001`, one per pair.
fn tenant_secrets(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(n, v)| {
            format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {n}}}\nstringData: {{token: sk-{v}-0001}}\n---\n")
        })
        .collect()
}

#[test]
fn tenant_keys_come_from_the_map_then_the_template_then_the_fallback() {
    let secrets = tenant_secrets(&[
        ("s", "house"),
        ("acme-anthropic", "acme"),
        ("globex-keys", "globex"),
        ("x-anthropic-extra", "no"),
    ]);
    let selector = |fallback: &str| {
        format!(
            "  target: Header\n  credentialSelector:\n    byTenant:\n      secretNameTemplate: '{{tenant}}-anthropic'\n      tenants: {{globex: {{secretRef: {{name: globex-keys}}}}}}\n    fallback: {fallback}"
        )
    };
    let fp = |v: &str| fingerprint(v.as_bytes());
    for fallback in ["Deny", "Default"] {
        let text = format!(
            "{GW}{}{}{secrets}",
            route("a", "{provider: anthropic}"),
            policy("p", "{name: a}", &selector(fallback))
        );
        let snap = compile(&text).unwrap();
        let key = |tenant: Option<&str>| match snap.decide("api.anthropic.com", "/v1/messages", tenant) {
            Decision::Inject { credential, .. } => Some(credential.fingerprint().to_owned()),
            Decision::TenantNotMapped { .. } => None,
            d => panic!("{d:?}"),
        };
        assert_eq!(key(Some("acme")), Some(fp("sk-acme-0001")), "template");
        assert_eq!(key(Some("globex")), Some(fp("sk-globex-0001")), "explicit map");
        let fallback_key = (fallback == "Default").then(|| fp("sk-house-0001"));
        assert_eq!(key(Some("initech")), fallback_key, "{fallback}: a tenant without a key");
        assert_eq!(key(None), fallback_key, "{fallback}: anonymous");
    }
    let bad = format!(
        "{GW}{}{}",
        route("a", "{provider: anthropic}"),
        policy(
            "p",
            "{name: a}",
            "  target: Header\n  credentialSelector: {byTenant: {secretNameTemplate: 'static-name'}}"
        )
    );
    let e = compile(&bad).unwrap_err();
    assert!(e.contains("secretNameTemplate") && e.contains("{tenant}"), "{e}");
}

/// Kubernetes mode went on without the namespace's Secret list (RBAC lets keyswap read the house
/// key by name, not list the namespace; or the list never came): a tenant the template would
/// find a key for is not put on the house key, whose bill it is not (503); the anonymous caller
/// still gets the fallback.
/// The attack: a caller that names its own tenant (a JWT claim, an edge-trust header) picks
/// `ci` under the template `{tenant}-token`, or anything under `{tenant}`: the gateway's shared
/// agent token, its HS256 key or its Redis URL was that tenant's "key", written upstream. A
/// template matches no Secret the gateway reads for itself.
#[test]
fn a_tenant_template_never_matches_the_gateways_own_secrets() {
    let gw = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec:\n  agentAuth:\n    validators:\n    - sharedToken: {secretRef: {name: ci-token}}\n    - {name: idp, jwt: {issuer: i, audiences: [a], hs256SecretRef: {name: hs-token}, claimMapping: {tenant: org}}}\n---\n";
    let labelled = "apiVersion: v1\nkind: Secret\nmetadata: {name: a1-token, labels: {keyswap.dev/agent-token: 'true'}}\nstringData: {sha256: 0000000000000000000000000000000000000000000000000000000000000000, agent: a1, token: x}\n---\n";
    let text = format!(
        "{gw}{}{}{}{}{}{}{labelled}",
        route("a", "{provider: anthropic}"),
        policy("p", "{name: a}", "  target: Header\n  credentialSelector: {byTenant: {secretNameTemplate: '{tenant}-token'}, fallback: Deny}"),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: ci-token}\nstringData: {token: shared-agent-token-0001}\n---\n",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: hs-token}\nstringData: {token: hs256-key-of-32-bytes-or-more-0001}\n---\n",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: acme-token}\nstringData: {token: sk-acme-0001}\n---\n",
        secret("  token: sk-house-0001"),
    );
    let snap = compile(&text).unwrap();
    for tenant in ["ci", "hs", "a1"] {
        let d = snap.decide("api.anthropic.com", "/v1/messages", Some(tenant));
        assert!(matches!(d, Decision::TenantNotMapped { .. }), "tenant {tenant}: {d:?}");
    }
    let Decision::Inject { credential, .. } = snap.decide("api.anthropic.com", "/v1/messages", Some("acme")) else {
        panic!("acme's own key")
    };
    assert_eq!(credential.fingerprint(), fingerprint(b"sk-acme-0001"));
}

/// The attack: a caller naming its own tenant after the house key's stem (`house` under
/// `{tenant}-k` beside a house key `house-k`) got the house key `fallback: Deny` withholds;
/// naming it after the Secret of another tenant (`initech` where globex's key is `initech-k`),
/// that tenant's key. A template matches neither.
#[test]
fn a_tenant_named_after_a_policys_own_secret_gets_no_key_under_deny() {
    let secrets =
        tenant_secrets(&[("house-k", "house"), ("initech-k", "globex"), ("q-k", "other-policy"), ("acme-k", "acme")]);
    let policy = |name: &str, parent: &str, secret: &str, rest: &str| {
        format!("apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: {parent}}}]\n  secretRef: {{name: {secret}}}\n  target: Header\n{rest}---\n")
    };
    // globex's own key is in a Secret named like another tenant's (`initech-k`).
    let selector = "  credentialSelector:\n    byTenant:\n      secretNameTemplate: '{tenant}-k'\n      tenants: {globex: {secretRef: {name: initech-k}}}\n    fallback: Deny\n";
    let text = format!(
        "{GW}{}{}{}{}{secrets}",
        route("a", "{provider: anthropic}"),
        route("o", "{provider: openai}"),
        policy("p", "a", "house-k", selector),
        policy("q", "o", "q-k", ""),
    );
    let snap = compile(&text).unwrap();
    for tenant in ["house", "initech"] {
        let d = snap.decide("api.anthropic.com", "/v1/messages", Some(tenant));
        assert!(matches!(d, Decision::TenantNotMapped { .. }), "tenant {tenant}: {d:?}");
    }
    let key = |tenant: &str| match snap.decide("api.anthropic.com", "/v1/messages", Some(tenant)) {
        Decision::Inject { credential, .. } => credential.fingerprint().to_owned(),
        d => panic!("{tenant}: {d:?}"),
    };
    // Another policy's Secret named by the template is that tenant's (a dedicated route for `q`
    // using q's key): it stays q's.
    assert_eq!(key("q"), fingerprint(b"sk-other-policy-0001"));
    assert_eq!(key("acme"), fingerprint(b"sk-acme-0001"), "a tenant's own Secret still matches");
    assert_eq!(key("globex"), fingerprint(b"sk-globex-0001"));
}

#[test]
fn a_tenant_whose_secret_could_not_be_listed_never_falls_back_to_the_house_key() {
    let text = format!(
        "{GW}{}{}{}",
        route("a", "{provider: anthropic}"),
        policy("p", "{name: a}", "  target: Header\n  credentialSelector: {byTenant: {secretNameTemplate: '{tenant}-anthropic'}, fallback: Default}"),
        secret("  token: sk-house-0001"),
    );
    let (objs, errs) = parse_file(std::path::Path::new("t.yaml"), &text);
    assert!(errs.is_empty(), "{errs:?}");
    for unlisted in [false, true] {
        let mut cat = Catalog::build_isolated(objs.clone());
        if unlisted {
            cat.unlisted.insert("default".into());
        }
        let snap = cat.compile_isolated(&Key::new("default", "egress")).unwrap();
        let tenant = snap.decide("api.anthropic.com", "/v1/messages", Some("acme"));
        let anonymous = snap.decide("api.anthropic.com", "/v1/messages", None);
        assert!(matches!(anonymous, Decision::Inject { .. }), "{anonymous:?}");
        match (unlisted, tenant) {
            (false, Decision::Inject { credential, .. }) => {
                assert_eq!(credential.fingerprint(), fingerprint(b"sk-house-0001"))
            }
            (true, Decision::FailClosed { reason, .. }) => {
                assert_eq!(reason.to_string(), "Secret default/{tenant}-anthropic not found")
            }
            (u, d) => panic!("unlisted {u}: {d:?}"),
        }
    }
}

/// The attack: a tenant who may create Secrets in the policy's namespace (onboarding by
/// Secret) creates one the template matches with a value that cannot travel in a header. The
/// whole policy used to fail: the house key and every tenant's answered 503.
#[test]
fn one_tenants_unusable_secret_fails_that_tenant_alone() {
    let secret = |n: &str, v: &str| {
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {n}}}\nstringData: {{token: \"{v}\"}}\n---\n")
    };
    let text = format!(
        "{GW}{}{}{}{}{}",
        route("a", "{provider: anthropic}"),
        policy("p", "{name: a}", "  target: Header\n  credentialSelector: {byTenant: {secretNameTemplate: '{tenant}-anthropic'}, fallback: Default}"),
        secret("s", "sk-house-0001"),
        secret("acme-anthropic", "sk-acme-0001"),
        secret("broken-anthropic", "sk-line\\nbreak"),
    );
    let (objs, errs) = parse_file(std::path::Path::new("t.yaml"), &text);
    assert!(errs.is_empty(), "{errs:?}");
    let snap = Catalog::build_isolated(objs).compile_isolated(&Key::new("default", "egress")).unwrap();
    let decide = |t: &str| snap.decide("api.anthropic.com", "/v1/messages", Some(t));
    assert!(matches!(decide("acme"), Decision::Inject { .. }), "{:?}", decide("acme"));
    assert!(matches!(decide("nobody"), Decision::Inject { .. }), "the house key (fallback) stopped serving");
    let Decision::FailClosed { reason, .. } = decide("broken") else { panic!("{:?}", decide("broken")) };
    assert!(matches!(reason, Unresolved::InvalidSecret { .. }), "{reason:?}");
    assert!(!format!("{reason}").contains("sk-line"), "{reason}");
}

#[test]
fn allow_entries_name_a_host_and_a_port_and_a_bad_one_names_its_field() {
    let gw = |allow: &str| {
        format!("apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  allow: {allow}\n---\n")
    };
    let snap = compile(&gw("[PyPI.org, 'github.com:22', '*.example.com:*']")).unwrap();
    let shown: Vec<String> = snap.allow.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["pypi.org", "github.com:22", "*.example.com:*"]);
    assert!(matches!(snap.decide("pypi.org", "/", None), Decision::PassThrough { .. }));
    assert!(matches!(snap.decide("pypi.org:8443", "/", None), Decision::Deny));
    assert!(matches!(snap.decide("github.com:22", "/", None), Decision::PassThrough { .. }));
    assert!(matches!(snap.decide("github.com", "/", None), Decision::Deny));
    for (allow, words) in [
        ("['pypi.org:70000']", "1-65535"),
        ("['pypi.org:']", "1-65535"),
        ("['https://pypi.org']", "not a host"),
        ("[ok.example, 'pypi.org/simple']", "not a host"),
    ] {
        let e = compile(&gw(allow)).unwrap_err();
        let index = if allow.starts_with("[ok") { "spec.allow[1]" } else { "spec.allow[0]" };
        assert!(
            e.contains("t.yaml")
                && e.contains("EgressGateway default/egress")
                && e.contains(index)
                && e.contains(words),
            "{allow}: {e}"
        );
    }
}

#[test]
fn allow_entries_for_routed_hosts_are_named_as_changing_nothing() {
    let gw = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec:\n  allow: [api.openai.com, 'api.openai.com:8443', x.openai.azure.com, a.b.openai.azure.com, '*.openai.azure.com', '*.googleapis.com', pypi.org, bedrock-runtime.us-east-1.amazonaws.com]\n---\n";
    let routes = route("openai", "{provider: openai}")
        + &route("azure", "{provider: azure-openai, hosts: ['*.openai.azure.com']}")
        + &route("bedrock", "{provider: bedrock}");
    let snap = compile(&format!("{gw}{routes}")).unwrap();
    let named: Vec<String> = snap.allow_entries_of_routed_hosts().iter().map(ToString::to_string).collect();
    // A wildcard that reaches unrouted hosts too (`*.googleapis.com`) does change something; so
    // do a host two labels under a routed `*.` and one under a pattern no certificate carries
    // (Bedrock's default `bedrock-runtime.*.amazonaws.com` is never terminated: the entry is
    // what lets a CONNECT to it through).
    assert_eq!(named, ["api.openai.com", "api.openai.com:8443", "x.openai.azure.com", "*.openai.azure.com"]);
}

/// The attack: on a deny-all gateway that lists a routed host in `allow`, call an endpoint or
/// model the route leaves out, with the agent's own key. It must be refused as it would be
/// without the entry ("changes nothing", as `check` says), not passed through untouched.
#[test]
fn an_excluded_endpoint_on_an_allow_listed_routed_host_is_refused_not_passed_through() {
    let gw = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec:\n  allow: [api.openai.com, 'x.openai.azure.com:*', pypi.org]\n---\n";
    let routes = route("openai", "{provider: openai, endpoints: ['/v1/chat/completions']}")
        + &route("azure", "{provider: azure-openai, hosts: ['*.openai.azure.com'], models: [gpt-4o]}");
    let snap = compile(&format!("{gw}{routes}")).unwrap();
    for (host, path) in [
        ("api.openai.com", "/v1/files"),
        ("api.openai.com:443", "/v1/files"),
        ("x.openai.azure.com", "/openai/deployments/o1/chat/completions"),
    ] {
        assert!(matches!(snap.decide(host, path, None), Decision::Deny), "{host}{path}");
    }
    assert!(matches!(snap.decide("pypi.org", "/simple", None), Decision::PassThrough { .. }));
    // An allow-all gateway passes what no route takes, as it passes everything else.
    let all = gw.replace("spec:\n", "spec:\n  defaultPolicy: allow-all\n");
    let snap = compile(&format!("{all}{routes}")).unwrap();
    assert!(matches!(snap.decide("api.openai.com", "/v1/files", None), Decision::PassThrough { .. }));
}

/// The attack: spell the path of a route restricted to an endpoint (and budgeted) another way a
/// lenient provider reads the same (`/v1/Chat/Completions/`, `/v1/chat%2Fcompletions`,
/// `…/completions;x`) to land on a broader route without the budget, and dodge the usage asked
/// for Chat Completions streams. Every classification reads the canonical path.
#[test]
fn a_path_spelled_with_a_trailing_slash_encoded_slash_or_capitals_is_classified_as_its_canonical_form() {
    use crate::target::CanonicalPath;
    let routes =
        route("chat", "{provider: openai, endpoints: ['/v1/Chat/Completions']}") + &route("rest", "{provider: openai}");
    let snap = compile(&format!("{GW}{routes}")).unwrap();
    let route_of = |path: &str| match snap.decide("api.openai.com", path, None) {
        Decision::Inject { entry, .. } | Decision::FailClosed { entry, .. } => entry.route.to_string(),
        other => panic!("{path}: no route: {other:?}"),
    };
    for path in [
        "/v1/chat/completions",
        "/v1/Chat/Completions/",
        "/v1/chat%2Fcompletions",
        "/v1/chat/completions;x=1",
        "//v1//chat/completions?stream=true",
        "/V1/CHAT/COMPLETIONS",
    ] {
        assert!(route_of(path).ends_with("/chat"), "{path}: {}", route_of(path));
    }
    assert!(route_of("/v1/embeddings").ends_with("/rest"));
    // Endpoints are read in the same form: a glob written with capitals, a trailing `/`, an
    // encoded `:` (as Bedrock's ARNs travel) still matches what it names.
    let routes = route("models", "{provider: openai, endpoints: ['/V1/Models/', '/v1/x%3Ay']}")
        + &route("rest", "{provider: openai}");
    let snap = compile(&format!("{GW}{routes}")).unwrap();
    for path in ["/v1/models", "/v1/x:y", "/v1/x%3Ay"] {
        match snap.decide("api.openai.com", path, None) {
            Decision::Inject { entry, .. } | Decision::FailClosed { entry, .. } => {
                assert!(entry.route.ends_with("/models"), "{path}: {}", entry.route)
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    assert_eq!(crate::target::canonical_path("/v1/chat/completions?x=/Y"), "/v1/chat/completions");
    assert!(matches!(crate::target::canonical_path("/v1/chat/completions"), std::borrow::Cow::Borrowed(_)));
    assert_eq!(crate::target::canonical_path("/v1/Chat%2FCompletions/;a"), "/v1/chat/completions");
    // Not idempotent, hence one `CanonicalPath` per request: an encoded `%2F` is decoded once.
    assert_eq!(&*CanonicalPath::of("/v1/a%252Fb"), "/v1/a%2fb");
    let format = |provider: &str, path: &str| crate::provider::usage::format_for(provider, &CanonicalPath::of(path));
    assert_eq!(format("anthropic", "/v1/Chat/Completions/"), Some(crate::provider::usage::Format::OpenAi));
    let azure = crate::provider::lookup("azure-openai").unwrap();
    assert_eq!(azure.model_from_path("/openai/Deployments/gpt-4o/chat/completions").as_deref(), Some("gpt-4o"));
}

/// The attack: on Vertex, name another project in the path (`/v1/projects/OTHER/…`) to run and
/// bill the call there, where the service account is granted too. An `endpoints` glob naming the
/// project (docs/providers.md) leaves such a path without a route.
#[test]
fn an_endpoints_glob_pins_the_vertex_project_an_agent_may_name() {
    let vertex =
        "{provider: google, hosts: [us-central1-aiplatform.googleapis.com], endpoints: ['/v1*/projects/my-project/*']}";
    let snap = compile(&format!("{GW}{}", route("vertex", vertex))).unwrap();
    let host = "us-central1-aiplatform.googleapis.com";
    let model = "locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent";
    let routed = |path: &str| !matches!(snap.decide(host, path, None), Decision::Deny | Decision::Refused(_));
    assert!(routed(&format!("/v1/projects/my-project/{model}")));
    assert!(routed(&format!("/v1beta1/projects/My-Project/{model}")));
    for other in ["/v1/projects/other-project/", "/v1/projects/my-project-2/", "/v1/projects/other/../my-project/"] {
        assert!(!routed(&format!("{other}{model}")), "{other}");
    }
}

#[test]
fn a_budget_may_limit_requests_in_flight_alone_and_never_to_zero() {
    let with = |limits: &str| {
        let budget = format!("apiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {{name: per-agent}}\nspec:\n  parentRefs: [{{kind: EgressGateway, name: egress}}]\n  key: Agent\n  window: Day\n  limits: {limits}\n---\n");
        compile(&format!("{GW}{}{budget}", route("openai", "{provider: openai}")))
    };
    let snap = with("{concurrentRequests: 2}").unwrap();
    let entry = match snap.decide("api.openai.com", "/v1/chat/completions", None) {
        Decision::Inject { entry, .. } | Decision::FailClosed { entry, .. } => entry,
        _ => panic!("no route"),
    };
    let b = &entry.budgets[0];
    assert_eq!((b.concurrent, b.counts_tokens()), (Some(2), false));
    assert!(b.describe().contains("concurrentRequests 2 at once (on each replica)"), "{}", b.describe());
    let e = with("{concurrentRequests: 0}").unwrap_err();
    assert!(
        e.contains("TokenBudget default/per-agent")
            && e.contains("spec.limits.concurrentRequests")
            && e.contains("at least 1"),
        "{e}"
    );
    let e = with("{}").unwrap_err();
    assert!(e.contains("spec.limits") && e.contains("concurrentRequests"), "{e}");
}

/// A mounted JWKS file is briefly missing while Kubernetes swaps a ConfigMap, or an operator
/// adds a validator before its file. That was an error on the gateway, so every reload meanwhile
/// was refused whole: a key rotated or a token revoked then did not take effect. Now the
/// validator alone is affected (it keeps the keys it read, or a new one admits no one) and the
/// rest of the reload applies; `keyswap check` still fails on it.
#[test]
fn a_broken_jwks_file_never_freezes_rotation_or_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    // One P-256 key (RFC 7515's example).
    std::fs::write(&jwks, r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "e", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#).unwrap();
    let keys_held = |snap: &Snapshot| {
        snap.agent_auth.as_ref()?.validators.iter().find_map(|v| match v {
            crate::auth::Validator::Jwt(j) => j.jwks.as_ref().map(|k| k.key_count()),
            _ => None,
        })
    };
    let text = |key: &str, file: &std::path::Path| {
        let gw = format!("apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    validators: [{{jwt: {{issuer: i, audiences: [a], jwksFile: '{}'}}}}]\n---\n", file.display());
        format!(
            "{gw}{}{}{}",
            route("r", "{provider: openai}"),
            policy("a", "{name: r}", "  target: Header"),
            secret(&format!("  token: {key}"))
        )
    };
    let isolated = |text: &str| {
        let (objs, errs) = parse_file(std::path::Path::new("t.yaml"), text);
        assert!(errs.is_empty(), "{errs:?}");
        Catalog::build_isolated(objs).compile_isolated(&Key::new("default", "egress"))
    };
    let first = isolated(&text("sk-old", &jwks)).unwrap();
    assert!(first.rejected.is_empty(), "{:?}", first.rejected);
    assert_eq!(keys_held(&first), Some(1));
    std::fs::remove_file(&jwks).unwrap();
    // The validator that held a key keeps it; a new one holds none (admits no one).
    for (file, held) in [(jwks.clone(), 1), (dir.path().join("new-validator.json"), 0)] {
        let snap = isolated(&text("sk-rotated", &file)).expect("the reload was refused whole");
        let Decision::Inject { credential, .. } = snap.decide("api.openai.com", "/v1/models", None) else { panic!() };
        assert_eq!(credential.value(), b"Bearer sk-rotated", "the rotation did not take effect");
        let rejected = snap.rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
        assert!(rejected.contains("jwksFile") && rejected.contains("cannot read"), "{rejected}");
        assert_eq!(keys_held(&snap), Some(held), "{}", file.display());
        assert!(compile(&text("sk-rotated", &file)).unwrap_err().contains("cannot read"), "check passes it");
    }
}

#[test]
fn agent_auth_validators_are_checked_and_name_the_field() {
    let gw = |validators: &str| {
        format!("apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    validators: {validators}\n---\n")
    };
    for (validators, field, words) in [
        ("[]", "spec.agentAuth.validators", "at least one"),
        ("[{apiKeys: {}, sharedToken: {secretRef: {name: t}}}]", "spec.agentAuth.validators[0]", "exactly one"),
        ("[{jwt: {issuer: i, audiences: [], jwksUrl: 'https://idp/jwks'}}]", "audiences", "at least one"),
        ("[{jwt: {issuer: i, audiences: [a], jwksUrl: 'http://idp/jwks'}}]", "jwksUrl", "https://"),
        ("[{jwt: {issuer: i, audiences: [a]}}]", "spec.agentAuth.validators[0].jwt", "needs keys"),
        ("[{jwt: {issuer: i, audiences: [a], jwksFile: /nonexistent/jwks.json}}]", "jwksFile", "cannot read"),
        ("[{edgeTrust: {agentHeader: x-agent}}]", "edgeTrust", "trusts nobody"),
        ("[{edgeTrust: {agentHeader: x-agent, trustedCidrs: [10.0.0.0/40]}}]", "trustedCidrs[0]", "prefix"),
        ("[{sharedToken: {secretRef: {name: missing}}}]", "sharedToken.secretRef", "default/missing"),
        // A namespace was accepted and ignored: the Secret read was the gateway's namespace's.
        (
            "[{sharedToken: {secretRef: {name: t, namespace: other}}}]",
            "sharedToken.secretRef.namespace",
            "own namespace",
        ),
        (
            "[{jwt: {issuer: i, audiences: [a], hs256SecretRef: {name: t, namespace: other}}}]",
            "hs256SecretRef.namespace",
            "own namespace",
        ),
        // Two validators of one name would count their agents as one in per-agent budgets.
        (
            "[{apiKeys: {}}, {name: apiKeys, edgeTrust: {agentHeader: x-a, trustMtls: true, mtlsPeers: ['*']}}]",
            "validators[1].name",
            "earlier",
        ),
        ("[{name: 'a/b', apiKeys: {}}]", "validators[0].name", "no `/`"),
        // In a mesh every workload holds a certificate the CA signed: the hop's must be named.
        ("[{edgeTrust: {agentHeader: x-a, trustMtls: true}}]", "edgeTrust.mtlsPeers", "required with trustMtls"),
        ("[{edgeTrust: {agentHeader: x-a, trustedCidrs: [10.0.0.0/8], mtlsPeers: ['*']}}]", "mtlsPeers", "only with"),
        ("[{apiKeys: {}, tenants: [acme, ' ']}]", "validators[0].tenants[1]", "is empty"),
    ] {
        let e = compile(&gw(validators)).unwrap_err();
        assert!(e.contains(field) && e.contains(words), "{validators}: {e}");
    }
    let shared = "apiVersion: v1\nkind: Secret\nmetadata: {name: t}\nstringData: {token: team-token}\n";
    let validators = "[{sharedToken: {secretRef: {name: t}, tenant: acme}, tenants: [globex]}]";
    let e = compile(&format!("{}{shared}", gw(validators))).unwrap_err();
    assert!(e.contains("validators[0].sharedToken.tenant") && e.contains("`tenants`"), "{e}");
    let token = "apiVersion: v1\nkind: Secret\nmetadata: {name: t1, labels: {keyswap.dev/agent-token: 'true'}}\nstringData: {sha256: nothex, agent: a}\n";
    let e = compile(&format!("{}{token}", gw("[{apiKeys: {}}]"))).unwrap_err();
    assert!(e.contains("Secret default/t1") && e.contains("sha256"), "{e}");
}

/// The attack: an admitted team lists thousands of hosts (or hosts of 250 characters). One leaf
/// certificate names every routed host, and past 64 KiB no TLS client takes it: TLS to every
/// terminated host, the platform's too, would fail. A match listing more than 100 hosts is
/// refused with its route; hosts past the gateway's cap are left out of the routes that bring
/// them, the gateway's own namespace's kept first, and the leaf stays one clients take.
#[test]
fn a_route_with_thousands_of_hosts_is_refused_alone_and_never_grows_the_shared_leaf() {
    let team = |ns: &str, name: &str, hosts: Vec<String>| {
        namespaced(&[
            (ns, "AIProviderRoute", name, &format!("spec: {{parentRefs: [{{name: egress, namespace: platform}}], rules: [{{matches: [{{provider: openai, hosts: [{}]}}]}}]}}", hosts.join(", "))),
            (ns, "CredentialInjectionPolicy", &format!("{name}-k"), &format!("spec: {{parentRefs: [{{name: {name}}}], secretRef: {{name: t}}, target: Header}}")),
        ])
    };
    let mut text = platform_openai("allowedRoutes: {namespaces: [aaa, bbb]}")
        + &namespaced(&[
            ("aaa", "Secret", "t", "stringData: {token: aaa-key}"),
            ("bbb", "Secret", "t", "stringData: {token: bbb-key}"),
        ]);
    text += &team("aaa", "many", (0..3000).map(|i| format!("h{i}.aaa.example")).collect());
    // Names of about 200 characters: 250 of them are 50 KB of names.
    let long =
        |r: usize, i: usize| format!("{}.{}.{}.r{r}-{i}.bbb.example", "x".repeat(60), "y".repeat(60), "z".repeat(60));
    for r in 0..5 {
        text += &team("bbb", &format!("long-{r}"), (0..50).map(|i| long(r, i)).collect());
    }
    let (snap, errors) = compile_isolated(&text);
    assert!(
        errors.contains("AIProviderRoute aaa/many") && errors.contains("lists 3000 hosts; at most 100 per match"),
        "{errors}"
    );
    let Decision::Inject { entry, .. } = snap.decide("api.openai.com", "/v1/models", None) else {
        panic!("the platform stopped serving")
    };
    assert_eq!(&*entry.route, "platform/openai");
    let lost = snap.rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    assert!(lost.contains("AIProviderRoute bbb/long-4") && lost.contains("past what one gateway terminates"), "{lost}");
    assert!(
        matches!(snap.decide(&long(0, 0), "/v1/models", None), Decision::Inject { .. }),
        "hosts within the cap stay"
    );
    // As the leaf is made (`envoy::leaf_hosts`).
    let (hosts, _) =
        crate::certs::certifiable(snap.routes.entries.iter().flat_map(|e| e.hosts.iter().map(|h| h.to_string())));
    assert!(hosts.len() <= super::hosts::MAX_GATEWAY_HOSTS && hosts.iter().any(|h| h == "api.openai.com"));
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    crate::certs::ensure_ca(dir.path(), &Key::new("platform", "egress"), now).unwrap();
    let leaf =
        crate::certs::Ca::load(dir.path()).unwrap().mint(&hosts, now, std::time::Duration::from_secs(3600)).unwrap();
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes()).next().unwrap().unwrap();
    assert!(der.len() < 64 * 1024, "a leaf of {} bytes, which no rustls client takes", der.len());
}

/// Errors reach logs, `keyswap check` output and Kubernetes status, which more people read than
/// the Secrets: a key or a URL with credentials pasted into the wrong field must not be quoted
/// back. A short typo still is.
#[test]
fn a_value_pasted_into_expires_jwks_url_or_query_param_name_is_never_quoted() {
    let pasted = "sk-live-0123456789abcdef0123456789abcdef";
    let gw = |validators: &str| {
        format!("apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    validators: {validators}\n---\n")
    };
    let token = format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: t1, labels: {{keyswap.dev/agent-token: 'true'}}}}\nstringData: {{sha256: '{}', agent: a, expires: '{pasted}'}}\n", "a".repeat(64));
    let bedrock = |region: &str| {
        format!(
            "{GW}{}{}",
            route("r", "{provider: bedrock}"),
            policy(
                "a",
                "{name: r}",
                &format!("  target: ProviderAuth\n  providerAuth: {{type: AWSv4, region: '{region}'}}")
            )
        )
    };
    let query = format!(
        "{GW}{}{}",
        route("r", "{provider: google}"),
        policy("a", "{name: r}", &format!("  target: QueryParam\n  queryParamName: '{pasted}=&'"))
    );
    for (text, field) in [
        (format!("{}{token}", gw("[{apiKeys: {}}]")), "expires"),
        (gw("[{jwt: {issuer: i, audiences: [a], jwksUrl: 'http://user:hunter2-token@idp.example/jwks'}}]"), "jwksUrl"),
        (bedrock(&format!("{pasted}/x")), "providerAuth.region"),
        (query, "queryParamName"),
    ] {
        let e = compile(&text).unwrap_err();
        assert!(e.contains(field), "{field}: {e}");
        assert!(!e.contains(pasted) && !e.contains("hunter2"), "{field} quoted: {e}");
    }
    let e = compile(&bedrock("us east 1")).unwrap_err();
    assert!(e.contains("`us east 1` is not a valid AWS region"), "a typo is no longer shown: {e}");
}

/// The attack: whoever can create a labelled Secret in the gateway's namespace copies another
/// agent's token digest into one of its own, naming its own tenant (and so its own key, its own
/// provider account, where the victim's prompts would then be read). The later Secret used to
/// win. Now the shared digest admits no one, and the error names both Secrets.
#[test]
fn a_copied_token_digest_rebinds_no_one() {
    let digest = crate::auth::hex(&crate::auth::token_digest(b"ksa_victim"));
    let token = |name: &str, tenant: &str| {
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, labels: {{keyswap.dev/agent-token: 'true'}}}}\nstringData: {{sha256: '{digest}', agent: {name}, tenant: {tenant}}}\n---\n")
    };
    let gw = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec:\n  agentAuth:\n    validators: [{apiKeys: {}}]\n---\n";
    let text = format!("{gw}{}{}", token("victim", "tenant-a"), token("zz-copy", "attacker"));
    let (objs, errs) = parse_file(std::path::Path::new("t.yaml"), &text);
    assert!(errs.is_empty(), "{errs:?}");
    let cat = Catalog::build_isolated(objs);
    let snap = cat.compile_isolated(&Key::new("default", "egress")).unwrap();
    let errors = cat.rejected.errors.iter().chain(&snap.rejected).map(|e| e.to_string()).collect::<Vec<_>>();
    let chain = snap.agent_auth.as_ref().unwrap();
    let admitted =
        chain.admit(Some(b"ksa_victim"), &crate::auth::Peer::default(), |_| None, std::time::SystemTime::now());
    assert!(!matches!(admitted, crate::auth::Admission::Admitted(_)), "the copied digest admitted someone: {errors:?}");
    let named =
        errors.iter().any(|e| e.contains("Secret default/zz-copy") && e.contains("already Secret default/victim"));
    assert!(named, "{errors:?}");
}

#[test]
fn catch_all_policy_on_the_gateway_binds_every_route_with_each_providers_header() {
    let text = format!(
        "{GW}{}{}{}apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\nstringData: {{token: k}}\n",
        route("a", "{provider: anthropic}"),
        route("o", "{provider: openai}"),
        policy("all", "{kind: EgressGateway, name: egress}", "  target: Header"),
    );
    let snap = compile(&text).unwrap();
    let Decision::Inject { credential, .. } = snap.decide("api.openai.com", "/v1/x", None) else { panic!() };
    assert_eq!(credential.value(), b"Bearer k");
    let Decision::Inject { credential, .. } = snap.decide("api.anthropic.com", "/v1/messages", None) else { panic!() };
    assert_eq!(credential.value(), b"k");
    assert!(format!("{credential:?}").contains("<redacted>"));
}

#[test]
fn a_route_without_any_policy_fails_closed() {
    let snap = compile(&format!("{GW}{}", route("r", "{provider: anthropic}"))).unwrap();
    assert!(matches!(
        snap.decide("api.anthropic.com", "/", None),
        Decision::FailClosed { reason: Unresolved::NoPolicy, .. }
    ));
    assert!(matches!(snap.decide("other.test", "/", None), Decision::Deny));
}

#[test]
fn wildcard_hosts_and_models_in_the_path_match() {
    let text = format!(
        "{GW}{}{}apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\nstringData: {{token: k}}\n",
        route("az", "{provider: azure-openai, models: [gpt-4o*]}"),
        policy("p", "{name: az}", "  target: Header"),
    );
    let snap = compile(&text).unwrap();
    let d =
        snap.decide("myres.openai.azure.com", "/openai/deployments/gpt-4o-mini/chat/completions?api-version=1", None);
    let Decision::Inject { credential, .. } = d else { panic!("{d:?}") };
    assert_eq!(credential.describe(), "header `api-key`");
    assert!(matches!(
        snap.decide("myres.openai.azure.com", "/openai/deployments/o1/chat/completions", None),
        Decision::Deny
    ));
    assert!(matches!(snap.decide("a.b.openai.azure.com", "/openai/deployments/gpt-4o/x", None), Decision::Deny));
}

/// Every secret value the compiled `text` scrubs, in each form.
fn secret_forms(text: &str) -> Vec<String> {
    let snap = compile(text).unwrap();
    snap.secret_values().iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

fn secret(data: &str) -> String {
    format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\nstringData:\n{data}\n---\n")
}

/// The forms scrubbed of an OpenAI key `value` a `target: Header` policy writes, the policy's
/// other fields `rest`.
fn header_key_forms(rest: &str, value: &str) -> Vec<String> {
    let text = format!(
        "{GW}{}{}{}",
        route("r", "{provider: openai}"),
        policy("p", "{name: r}", &format!("  target: Header{rest}")),
        secret(&format!("  token: {value}"))
    );
    secret_forms(&text)
}

/// A key with a `/` is scrubbed as it is, query-encoded, and as JSON encoders that escape `/`
/// write it (an upstream echoing it in a JSON string).
#[test]
fn a_key_is_scrubbed_in_each_form_it_travels_in() {
    let forms = header_key_forms("", "sk-a/b+c");
    for form in ["sk-a/b+c", "sk-a%2Fb%2Bc", "sk-a\\/b+c"] {
        assert!(forms.iter().any(|f| f == form), "{form} not in {forms:?}");
    }
}

/// A gateway Envoy's resources cannot express (a listener mode not built, two listeners on one
/// port) is refused with the field named, as any bad manifest: accepted, keyswap served it while
/// Envoy kept its last resources, leaf renewals included, until the leaf expired.
#[test]
fn a_gateway_envoy_cannot_take_is_refused_with_its_field() {
    let gw = |listeners: &str| {
        format!("apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec: {{listeners: [{listeners}]}}\n---\n{}", route("r", "{provider: openai}"))
    };
    let passthrough = compile(&gw(
        "{name: p, protocol: CONNECT, port: 10000}, {name: t, protocol: HTTPS, port: 10443, tls: {mode: Passthrough}}",
    ))
    .unwrap_err();
    assert!(passthrough.contains("spec.listeners[1].tls.mode") && passthrough.contains("Passthrough"), "{passthrough}");
    let twice =
        compile(&gw("{name: a, protocol: CONNECT, port: 10000}, {name: b, protocol: HTTPS, port: 10000}")).unwrap_err();
    assert!(twice.contains("spec.listeners[1].port") && twice.contains("10000 is used twice"), "{twice}");
    compile(&gw(
        "{name: a, protocol: CONNECT, port: 10000}, {name: b, protocol: HTTPS, port: 10443, tls: {mode: Terminate}}",
    ))
    .unwrap();
}

/// An operator who stores the header's whole value (`Bearer sk-…`, with `valuePrefix: ""`) and an
/// upstream that quotes the bare token back (`Incorrect API key provided: sk-…`, OpenAI's 401):
/// the bare token is scrubbed too, in each form. A scheme's short rest, or one with spaces, is not
/// a token, and is scrubbed only as a whole.
#[test]
fn a_key_stored_with_its_scheme_is_scrubbed_without_it_too() {
    let no_prefix = "\n  valuePrefix: \"\"";
    let forms = header_key_forms(no_prefix, "Bearer sk-live/abcdef");
    for form in ["Bearer sk-live/abcdef", "sk-live/abcdef", "sk-live%2Fabcdef", "sk-live\\/abcdef"] {
        assert!(forms.iter().any(|f| f == form), "{form} not in {forms:?}");
    }
    for (value, not) in [("Bearer abc", "abc"), ("Basic a b c d e f g h", "a b c d e f g h")] {
        let forms = header_key_forms(no_prefix, value);
        assert!(forms.iter().any(|f| f == value) && !forms.iter().any(|f| f == not), "{forms:?}");
    }
}

/// A session token written to its Secret by `echo` (a trailing newline) travels trimmed in
/// `x-amz-security-token`: an upstream echoing that header must still have it scrubbed, in each
/// form it travels in.
#[test]
fn a_session_token_stored_with_a_trailing_newline_is_scrubbed_as_it_is_sent() {
    let text = format!(
        "{GW}{}{}{}",
        route("r", "{provider: bedrock}"),
        policy("a", "{name: r}", "  target: ProviderAuth\n  providerAuth: {type: AWSv4}"),
        secret("  AWS_ACCESS_KEY_ID: AKIAREAL\n  AWS_SECRET_ACCESS_KEY: s3cr3t-value\n  AWS_SESSION_TOKEN: \"tok/en+1=\\n\"")
    );
    let forms = secret_forms(&text);
    // The attack: an upstream echoing the header in a JSON error through an encoder that writes
    // HTML-sensitive characters as `\u00XX` (ASP.NET's System.Text.Json: `+` in uppercase hex;
    // Gson: `=` in lowercase): the agent's JSON parser turns it back into the token.
    for form in ["tok/en+1=", "tok%2Fen%2B1%3D", "tok\\/en+1=", "tok/en\\u002B1=", "tok/en+1\\u003d"] {
        assert!(forms.iter().any(|f| f == form), "{form} not in {forms:?}");
    }
}

#[test]
fn header_values_must_travel_in_a_header_but_provider_auth_reads_multi_line_keys() {
    let text = format!(
        "{GW}{}{}{}",
        route("r", "{provider: openai}"),
        policy("a", "{name: r}", "  target: Header"),
        secret("  token: \"sk-live-value\\n\"")
    );
    let e = compile(&text).unwrap_err();
    assert!(e.contains("Secret default/s: field `token`: ends with a newline"), "{e}");
    assert!(!e.contains("sk-live-value"), "{e}");
}

#[test]
fn a_bedrock_key_never_goes_to_an_s3_bucket_named_bedrock_runtime() {
    // `bedrock-runtime.s3.amazonaws.com` is the bucket `bedrock-runtime` on S3's legacy endpoint;
    // the default pattern's `*` names regions only, so such a name is not the route's.
    let text = format!(
        "{GW}{}{}{}",
        route("r", "{provider: bedrock}"),
        policy("a", "{name: r}", "  target: Header"),
        secret("  token: bedrock-api-key")
    );
    let snap = compile(&text).unwrap();
    assert!(matches!(
        snap.decide("bedrock-runtime.us-east-1.amazonaws.com", "/model/m/converse", None),
        Decision::Inject { .. }
    ));
    for host in [
        "bedrock-runtime.s3.amazonaws.com",
        "bedrock-runtime.s3-external-1.amazonaws.com",
        "bedrock-runtime.execute-api.amazonaws.com",
    ] {
        let d = snap.decide(host, "/model/m/converse", None);
        assert!(matches!(d, Decision::Deny), "{host}: {d:?}");
    }
}

#[test]
fn provider_auth_compiles_and_names_missing_or_broken_keys() {
    let aws = |data: &str, extra: &str| {
        format!(
            "{GW}{}{}{}",
            route("r", &format!("{{provider: bedrock{extra}}}")),
            policy("a", "{name: r}", "  target: ProviderAuth\n  providerAuth: {type: AWSv4}"),
            secret(data)
        )
    };
    let full = aws("  AWS_ACCESS_KEY_ID: AKIAREAL\n  AWS_SECRET_ACCESS_KEY: s3cr3t-value", "");
    let snap = compile(&full).unwrap();
    let Decision::Inject { credential, .. } =
        snap.decide("bedrock-runtime.eu-west-1.amazonaws.com", "/model/m/converse", None)
    else {
        panic!("bedrock should inject")
    };
    assert!(matches!(credential, Credential::AwsV4(_)));
    assert!(!format!("{credential:?}").contains("s3cr3t"));
    assert!(snap.secret_values().contains(&b"s3cr3t-value".as_slice()));

    let missing = aws("  AWS_ACCESS_KEY_ID: AKIAREAL", "");
    let snap = compile(&missing).unwrap();
    let Decision::FailClosed { reason, .. } = snap.decide("bedrock-runtime.eu-west-1.amazonaws.com", "/", None) else {
        panic!("missing secret key must fail closed")
    };
    assert_eq!(reason.to_string(), "Secret default/s has no key `AWS_SECRET_ACCESS_KEY`");

    // An exact host that names no region needs spec.providerAuth.region.
    let e = compile(&aws("  AWS_ACCESS_KEY_ID: A\n  AWS_SECRET_ACCESS_KEY: B", ", hosts: [bedrock.internal.example]"))
        .unwrap_err();
    assert!(e.contains("host `bedrock.internal.example` names no AWS region"), "{e}");

    let gcp = |json: &str| {
        format!(
            "{GW}{}{}{}",
            route("r", "{provider: google}"),
            policy("a", "{name: r}", "  target: ProviderAuth\n  providerAuth: {type: GCPServiceAccount}"),
            secret(&format!("  service-account.json: '{json}'"))
        )
    };
    let snap = compile(&gcp("{\"type\": \"service_account\", \"client_email\": \"a@b\"}")).unwrap();
    let Decision::FailClosed { reason, .. } = snap.decide("generativelanguage.googleapis.com", "/", None) else {
        panic!("a broken key must fail closed")
    };
    assert_eq!(reason.reason(), "InvalidSecret");
    assert!(
        reason.to_string().starts_with(
            "Secret default/s key `service-account.json` is not a service-account key: field `private_key`"
        ),
        "{reason}"
    );
}

#[test]
fn wildcard_hosts_keep_entry_order_across_index_and_scan() {
    let custom = |name: &str, host: &str, endpoint: &str| {
        format!(
            "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: custom, hosts: ['{host}'], endpoints: ['{endpoint}']}}]}}]\n---\n"
        )
    };
    let text = format!(
        "{GW}{}{}{}{}{}",
        custom("a-scan", "api.*.com", "/a/*"),
        custom("b-label", "*.example.com", "/*"),
        custom("c-scan", "*x.example.com", "/*"),
        policy("p", "{kind: EgressGateway, name: egress}", "  target: Header\n  headerName: x-k"),
        secret("  token: v")
    );
    let snap = compile(&text).unwrap();
    let route = |host: &str, path: &str| match snap.decide(host, path, None) {
        Decision::Inject { entry, .. } => entry.route.to_string(),
        other => format!("{other:?}"),
    };
    // Both patterns match: the earlier route wins, whichever structure holds it.
    assert_eq!(route("api.example.com", "/a/1"), "default/a-scan");
    assert_eq!(route("api.example.com", "/b"), "default/b-label");
    assert_eq!(route("box.example.com", "/b"), "default/b-label");
    assert_eq!(route("API.Example.com:443", "/b"), "default/b-label");
    // One label only: deeper hosts do not match `*.example.com`.
    assert_eq!(route("a.b.example.com", "/b"), "Deny");
    assert_eq!(route("example.com", "/b"), "Deny");
}

/// Objects in several namespaces, as one configuration: `(namespace, kind, name, spec)`.
fn namespaced(objs: &[(&str, &str, &str, &str)]) -> String {
    objs.iter()
        .map(|(ns, kind, name, spec)| {
            let api = if *kind == "Secret" { "v1" } else { "keyswap.dev/v1alpha1" };
            format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\n{spec}\n---\n")
        })
        .collect()
}

/// The platform's gateway `platform/egress` (its spec's fields `gateway_spec`), its OpenAI route
/// and its catch-all house key.
fn platform_openai(gateway_spec: &str) -> String {
    namespaced(&[
        ("platform", "EgressGateway", "egress", &format!("spec: {{{gateway_spec}}}")),
        (
            "platform",
            "AIProviderRoute",
            "openai",
            "spec: {parentRefs: [{name: egress}], rules: [{matches: [{provider: openai}]}]}",
        ),
        (
            "platform",
            "CredentialInjectionPolicy",
            "house",
            "spec: {parentRefs: [{kind: EgressGateway, name: egress}], secretRef: {name: s}, target: Header}",
        ),
        ("platform", "Secret", "s", "stringData: {token: house-key}"),
    ])
}

fn compile_isolated(text: &str) -> (Snapshot, String) {
    let (objs, errs) = parse_file(std::path::Path::new("t.yaml"), text);
    assert!(errs.is_empty(), "{errs:?}");
    let cat = Catalog::build_isolated(objs);
    let errors = cat.rejected.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    (cat.compile_isolated(&Key::new("platform", "egress")).unwrap(), errors)
}

/// A team with rights in its own namespace only tries to: attach a route to the platform's
/// gateway and have the gateway's catch-all key sent to a host of its own; bind its own policy
/// (its key, its pinned organization) to the platform's route, or break it with a conflict;
/// attach a budget that stops every route; claim the platform's host first by namespace order.
#[test]
fn another_namespace_cannot_attach_bind_its_key_limit_or_take_over_a_host() {
    let platform = platform_openai;
    let team = namespaced(&[
        ("team-x", "AIProviderRoute", "evil", "spec: {parentRefs: [{name: egress, namespace: platform}], rules: [{matches: [{provider: anthropic, hosts: [llm.attacker.example]}]}]}"),
        ("team-x", "CredentialInjectionPolicy", "steal", "spec: {parentRefs: [{kind: AIProviderRoute, name: openai, namespace: platform}], secretRef: {name: t}, target: Header}"),
        ("team-x", "TokenBudget", "stop", "spec: {parentRefs: [{kind: EgressGateway, name: egress, namespace: platform}], key: Gateway, window: Day, limits: {requests: 1}}"),
        ("team-x", "Secret", "t", "stringData: {token: team-key}"),
    ]);
    let (snap, errors) = compile_isolated(&(platform("") + &team));
    assert!(errors.contains("AIProviderRoute team-x/evil: field `spec.parentRefs[0]`: EgressGateway platform/egress does not admit routes from namespace `team-x`"), "{errors}");
    assert!(
        errors.contains(
            "CredentialInjectionPolicy team-x/steal: field `spec.parentRefs[0]`: namespace `platform` is not allowed"
        ),
        "{errors}"
    );
    assert!(
        errors.contains("TokenBudget team-x/stop: field `spec.parentRefs[0]`: namespace `platform` is not allowed"),
        "{errors}"
    );
    assert!(matches!(snap.decide("llm.attacker.example", "/", None), Decision::Deny));
    let Decision::Inject { entry, credential } = snap.decide("api.openai.com", "/v1/models", None) else {
        panic!("the platform's route stopped serving")
    };
    assert_eq!(entry.binding.policy.as_deref(), Some("platform/house"));
    assert_eq!(credential.value(), b"Bearer house-key");
    assert!(entry.budgets.is_empty(), "another namespace's budget applies");

    // Admitted routes attach, but the catch-all key stays with the gateway's namespace, and the
    // platform's route keeps its host against a route that sorts first.
    let mine = namespaced(&[
        (
            "aaa",
            "AIProviderRoute",
            "mine",
            "spec: {parentRefs: [{name: egress, namespace: platform}], rules: [{matches: [{provider: openai}]}]}",
        ),
        (
            "aaa",
            "CredentialInjectionPolicy",
            "k",
            "spec: {parentRefs: [{name: mine}], secretRef: {name: t}, target: Header}",
        ),
        ("aaa", "Secret", "t", "stringData: {token: aaa-key}"),
    ]);
    let text = platform("allowedRoutes: {namespaces: [team-x, aaa]}") + &team + &mine;
    let (snap, _) = compile_isolated(&text);
    assert!(
        matches!(
            snap.decide("llm.attacker.example", "/", None),
            Decision::FailClosed { reason: Unresolved::NoPolicy, .. }
        ),
        "the gateway's catch-all key went to another namespace's route"
    );
    let Decision::Inject { entry, .. } = snap.decide("api.openai.com", "/v1/models", None) else { panic!() };
    assert_eq!(&*entry.route, "platform/openai");

    // An exact host under the platform's pattern would be tried first; an invalid platform route
    // would come after every valid one. Either way the host stays the platform's.
    let azure = namespaced(&[
        ("platform", "AIProviderRoute", "azure", "spec: {parentRefs: [{name: egress}], rules: [{matches: [{provider: azure-openai, hosts: ['*.openai.azure.com']}]}]}"),
        ("platform", "AIProviderRoute", "broken", "spec: {parentRefs: [{name: egress}], rules: [{matches: [{provider: anthropic, hosts: [llm.internal.example], models: [x]}]}]}"),
        ("aaa", "AIProviderRoute", "contoso", "spec: {parentRefs: [{name: egress, namespace: platform}], rules: [{matches: [{provider: azure-openai, hosts: [contoso.openai.azure.com, llm.internal.example, aaa.example.net]}]}]}"),
        ("aaa", "CredentialInjectionPolicy", "ck", "spec: {parentRefs: [{name: contoso}], secretRef: {name: t}, target: Header}"),
    ]);
    let (snap, errors) = compile_isolated(&(text + &azure));
    let Decision::Inject { entry, .. } = snap.decide("contoso.openai.azure.com", "/openai/x", None) else { panic!() };
    assert_eq!(&*entry.route, "platform/azure", "an exact host of another namespace beat the platform's pattern");
    assert!(
        matches!(
            snap.decide("llm.internal.example", "/", None),
            Decision::FailClosed { reason: Unresolved::Rejected { .. }, .. }
        ),
        "another namespace served a host of the platform's invalid route"
    );
    let Decision::Inject { entry, .. } = snap.decide("aaa.example.net", "/", None) else { panic!() };
    assert_eq!(&*entry.route, "aaa/contoso", "its own hosts stay");
    assert!(errors.is_empty() || !errors.contains("aaa.example.net"), "{errors}");
    let lost: Vec<String> = snap.rejected.iter().map(|e| e.to_string()).filter(|e| e.contains("aaa/contoso")).collect();
    assert!(
        lost.iter().any(|e| e
            .contains("host `contoso.openai.azure.com` is routed by EgressGateway platform/egress's own namespace")),
        "{lost:?}"
    );
}

/// Admitted teams, each with rights in its own namespace only, try to take hosts that are not
/// theirs: both route `api.anthropic.com`, and matching gave every agent's requests (prompts,
/// files) to whichever namespace sorts first, on its key and into its provider account; one
/// routes `github.com`, on the gateway's allow list, which would terminate it for every agent
/// and send their own GitHub calls on the team's token; one lays `*.openai.com` over the
/// platform's `api.openai.com`, whose `endpoints` leave `/v1/files` out, to serve that path.
#[test]
fn a_team_route_never_takes_a_host_another_team_the_allow_list_or_the_platform_has() {
    let team = |ns: &str, hosts: &str| {
        namespaced(&[
            (
                ns,
                "AIProviderRoute",
                "r",
                &format!(
                    "spec: {{parentRefs: [{{name: egress, namespace: platform}}], rules: [{{matches: [{hosts}]}}]}}"
                ),
            ),
            (
                ns,
                "CredentialInjectionPolicy",
                "k",
                "spec: {parentRefs: [{name: r}], secretRef: {name: t}, target: Header}",
            ),
            (ns, "Secret", "t", &format!("stringData: {{token: {ns}-key}}")),
        ])
    };
    let platform = namespaced(&[
        ("platform", "EgressGateway", "egress", "spec: {allowedRoutes: {namespaces: [aaa, bbb]}, allow: [github.com, '*.githubusercontent.com']}"),
        ("platform", "AIProviderRoute", "openai", "spec: {parentRefs: [{name: egress}], rules: [{matches: [{provider: openai, endpoints: [/v1/chat/completions]}]}]}"),
        ("platform", "CredentialInjectionPolicy", "house", "spec: {parentRefs: [{kind: EgressGateway, name: egress}], secretRef: {name: s}, target: Header}"),
        ("platform", "Secret", "s", "stringData: {token: house-key}"),
    ]);
    let text = platform
        + &team("aaa", "{provider: anthropic}, {provider: anthropic, hosts: [github.com, raw.githubusercontent.com, aaa.example.net]}")
        + &team("bbb", "{provider: anthropic}, {provider: openai, hosts: ['*.openai.com']}");
    let (snap, _) = compile_isolated(&text);
    let route = |host: &str, path: &str| match snap.decide(host, path, None) {
        Decision::Inject { entry, .. } => entry.route.to_string(),
        other => format!("{other:?}"),
    };
    for (host, path) in [("api.anthropic.com", "/v1/messages"), ("api.openai.com", "/v1/files")] {
        assert_eq!(route(host, path), "Deny", "{host}{path} went to a team's key");
    }
    for host in ["github.com", "raw.githubusercontent.com"] {
        assert!(route(host, "/").starts_with("PassThrough"), "{host} went to a team's key: {}", route(host, "/"));
    }
    assert_eq!(route("api.openai.com", "/v1/chat/completions"), "platform/openai");
    assert_eq!(route("aaa.example.net", "/"), "aaa/r", "a team's own host stays");
    assert_eq!(route("eu.openai.com", "/"), "bbb/r", "a team's pattern keeps the hosts no one else names");
    let lost = snap.rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    for (route, text) in [
        ("aaa/r", "host `api.anthropic.com` is also routed by another namespace"),
        ("bbb/r", "host `api.anthropic.com` is also routed by another namespace"),
        ("aaa/r", "host `github.com` is, or covers, an entry of EgressGateway platform/egress's allow list"),
        (
            "aaa/r",
            "host `raw.githubusercontent.com` is, or covers, an entry of EgressGateway platform/egress's allow list",
        ),
    ] {
        assert!(
            lost.lines().any(|l| l.contains(&format!("AIProviderRoute {route}")) && l.contains(text)),
            "{route}: {text}\n{lost}"
        );
    }
}

/// The same takeovers with a broader pattern: `*.*.azure.com` over the platform's
/// `*.openai.azure.com` (to serve the deployments its `endpoints` leave out), `*.github.com` over
/// the allow list's `api.github.com` (terminating it for every agent), `*.*.corp.example` over
/// another team's `*.team.corp.example`. The broader pattern yields each time.
#[test]
fn a_team_pattern_over_another_pattern_or_an_allow_listed_host_is_refused() {
    let route = |ns: &str, hosts: &str| {
        namespaced(&[
            (ns, "AIProviderRoute", "r", &format!("spec: {{parentRefs: [{{name: egress, namespace: platform}}], rules: [{{matches: [{{provider: anthropic, hosts: [{hosts}]}}]}}]}}")),
            (ns, "CredentialInjectionPolicy", "k", "spec: {parentRefs: [{name: r}], secretRef: {name: t}, target: Header}"),
            (ns, "Secret", "t", &format!("stringData: {{token: {ns}-key}}")),
        ])
    };
    let text = namespaced(&[
        ("platform", "EgressGateway", "egress", "spec: {allowedRoutes: {namespaces: [aaa, bbb]}, allow: [api.github.com]}"),
        ("platform", "AIProviderRoute", "azure", "spec: {parentRefs: [{name: egress}], rules: [{matches: [{provider: azure-openai, hosts: ['*.openai.azure.com'], endpoints: ['/openai/deployments/gpt-4o/*']}]}]}"),
        ("platform", "CredentialInjectionPolicy", "house", "spec: {parentRefs: [{kind: EgressGateway, name: egress}], secretRef: {name: s}, target: Header}"),
        ("platform", "Secret", "s", "stringData: {token: house-key}"),
    ]) + &route("aaa", "'*.*.azure.com', '*.github.com', '*.*.corp.example', aaa.example.net")
        + &route("bbb", "'*.team.corp.example'");
    let (snap, _) = compile_isolated(&text);
    let decide = |host: &str, path: &str| match snap.decide(host, path, None) {
        Decision::Inject { entry, .. } => entry.route.to_string(),
        other => format!("{other:?}"),
    };
    assert_eq!(decide("myres.openai.azure.com", "/openai/deployments/gpt-4o/chat/completions"), "platform/azure");
    assert_eq!(decide("myres.openai.azure.com", "/openai/deployments/other/chat/completions"), "Deny");
    assert!(decide("api.github.com", "/user").starts_with("PassThrough"), "{}", decide("api.github.com", "/user"));
    assert_eq!(decide("x.team.corp.example", "/"), "bbb/r");
    assert_eq!(decide("aaa.example.net", "/"), "aaa/r");
    let lost = snap.rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    for text in [
        "host `*.*.azure.com` covers a host pattern EgressGateway platform/egress's own namespace routes",
        "host `*.github.com` is, or covers, an entry of EgressGateway platform/egress's allow list",
        "host `*.*.corp.example` covers a host pattern another namespace routes",
    ] {
        assert!(lost.lines().any(|l| l.contains("AIProviderRoute aaa/r") && l.contains(text)), "{text}\n{lost}");
    }
    assert!(!lost.contains("bbb/r"), "the narrower pattern yielded: {lost}");
}

#[test]
fn a_secret_name_no_kubernetes_object_can_have_is_named_as_such_and_never_quoted() {
    for name in ["'x,y'", "Upper", "'sk-pasted/key='"] {
        let text = format!("{GW}{}{}", route("r", "{provider: openai}"), policy("a", "{name: r}", "  target: Header"))
            .replace("secretRef: {name: s}", &format!("secretRef: {{name: {name}}}"));
        let e = compile(&text).unwrap_err();
        assert!(e.contains("field `spec.secretRef.name`: is not a Kubernetes object name"), "{name}: {e}");
        assert!(!e.contains("sk-pasted"), "{e}");
    }
}

/// The revocation: an operator deletes the `sharedToken` Secret (or shortens the HS256 key) to
/// stop a token. That was an error on the gateway, so the whole reload was refused: the last good
/// configuration kept admitting the revoked token, and froze every other rotation with it. Now it
/// is an error on the Secret; the rest compiles and the token admits no one.
#[test]
fn deleting_a_shared_token_secret_revokes_it_and_freezes_nothing() {
    let gw = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec:\n  agentAuth:\n    validators:\n    - sharedToken: {secretRef: {name: ci-token}}\n    - jwt: {issuer: https://idp.test, audiences: [keyswap], hs256SecretRef: {name: jwt-hs256}}\n---\n";
    let text = format!(
        "{gw}{}{}{}",
        route("r", "{provider: openai}"),
        policy("a", "{name: r}", "  target: Header"),
        secret("  token: sk-rotated")
    );
    let short_hs = "apiVersion: v1\nkind: Secret\nmetadata: {name: jwt-hs256}\nstringData: {token: too-short}\n---\n";
    let (objs, errs) = parse_file(std::path::Path::new("t.yaml"), &format!("{text}{short_hs}"));
    assert!(errs.is_empty(), "{errs:?}");
    let cat = Catalog::build_isolated(objs);
    let snap = cat.compile_isolated(&Key::new("default", "egress")).expect("the rest of the gateway compiles");
    let rejected = snap.rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    assert!(rejected.contains("Secret default/ci-token") && rejected.contains("sharedToken.secretRef"), "{rejected}");
    assert!(rejected.contains("Secret default/jwt-hs256") && rejected.contains("at least 32 bytes"), "{rejected}");
    assert!(rejected.contains("admits no one") && !rejected.contains("too-short"), "{rejected}");
    let chain = snap.agent_auth.as_ref().unwrap();
    let admitted = chain.admit(Some(b"the-old-ci-token"), &Default::default(), |_| None, std::time::SystemTime::now());
    assert!(matches!(admitted, crate::auth::Admission::Rejected(_)));
    // The rotation in the same reload is in effect.
    assert!(snap.routes.entries[0].binding.credential.is_ok());
    // `keyswap check` (strict) still fails on it.
    let e = cat.compile(&Key::new("default", "egress")).unwrap_err().to_string();
    assert!(e.contains("Secret default/ci-token"), "{e}");
}
