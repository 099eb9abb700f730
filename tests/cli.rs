//! The command line as an operator uses it: `check`, `explain`, `--help`, startup errors.

mod common;

use std::process::Command;

use common::*;

fn keyswap(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keyswap")).args(args).env("RUST_LOG", "debug").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_secrets(text: &str) {
    for s in [ANTHROPIC_KEY, OPENAI_KEY, GEMINI_KEY, CUSTOM_KEY, "do-not-leak", "do not leak"] {
        assert!(!text.contains(s), "secret `{s}` printed:\n{text}");
    }
}

#[test]
fn check_prints_the_compiled_configuration_with_fingerprints_only() {
    let dir = config_dir();
    let (code, out, err) = keyswap(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_no_secrets(&out);
    assert_no_secrets(&err);
    assert!(
        out.contains("EgressGateway default/egress (defaultPolicy: deny-all, allow: allowed.example.com)"),
        "{out}"
    );
    assert!(out.contains("policy default/anthropic-key: writes header `x-api-key` = <redacted> sha256:"), "{out}");
    assert!(out.contains(&keyswap::config::fingerprint(ANTHROPIC_KEY.as_bytes())), "{out}");
    assert!(out.contains("policy default/gemini-key: writes query parameter `key` = <redacted>"), "{out}");
    assert!(out.contains("UNRESOLVED (SecretNotFound): Secret default/does-not-exist not found"), "{out}");
    // The standard config deliberately has two unresolvable routes: check says so and fails.
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(err.contains("2 route match(es) have no usable credential"), "{err}");
}

/// `keyswap check` on `config` plus the Secret `anthropic` (key `token`).
fn check_with_anthropic_key(config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let text = config.to_owned() + &secret_manifest("anthropic", "token", ANTHROPIC_KEY);
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    keyswap(&["check", "--config", dir.path().to_str().unwrap()])
}

/// An operator lists a provider's host in `spec.allow` (to open another port of it, say): a
/// CONNECT to a routed host is terminated and routed whatever its port, so the entry does
/// nothing. `check` says so, and still passes.
#[test]
fn check_warns_that_an_allow_entry_for_a_routed_host_changes_nothing() {
    let config = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec:\n  allow: ['api.anthropic.com:8443', pypi.org]\n---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: anthropic}\nspec:\n  parentRefs: [{name: egress}]\n  rules: [{matches: [{provider: anthropic}]}]\n---\napiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {name: anthropic-key}\nspec:\n  parentRefs: [{name: anthropic}]\n  secretRef: {name: anthropic}\n  target: Header\n---\n";
    let (code, out, err) = check_with_anthropic_key(config);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("warning: gateway default/egress: allow entry api.anthropic.com:8443 names a routed host")
            && !err.contains("entry pypi.org"),
        "{err}"
    );
    assert!(!out.contains("warning"), "warnings go to stderr: {out}");
}

/// A `custom` route listing `*.run.app` sends its key to any service under it, whoever deployed
/// it: `check` names such patterns. So does an Azure OpenAI route on `*.openai.azure.com`, listed
/// or by default: its `*` is a resource name any Azure customer picks, so an agent can send the
/// key (or an Entra token valid across resources) to any resource it names. A provider's own
/// names (Bedrock's regions) are fine.
#[test]
fn check_warns_that_a_host_pattern_not_the_providers_own_sends_the_key_to_any_name_under_it() {
    let config = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec: {}\n---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: mixed}\nspec:\n  parentRefs: [{name: egress}]\n  rules: [{matches: [{provider: custom, hosts: ['*.run.app', svc.internal.test]}, {provider: azure-openai, hosts: ['*.openai.azure.com']}, {provider: azure-openai}]}]\n---\napiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {name: key}\nspec:\n  parentRefs: [{name: mixed}]\n  secretRef: {name: anthropic}\n  target: Header\n  headerName: x-service-key\n---\n";
    let (code, out, err) = check_with_anthropic_key(config);
    assert_eq!(code, 0, "{out}\n{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains(": route")).collect();
    assert_eq!(warnings.len(), 3, "{err}");
    for host in ["*.run.app", "*.openai.azure.com", "*.cognitiveservices.azure.com"] {
        let line = format!("route default/mixed host {host}: route host pattern sends the key");
        assert!(warnings.iter().any(|w| w.contains(&line)), "{host}: {err}");
    }
    let bedrock = config.replace("provider: azure-openai, hosts: ['*.openai.azure.com']", "provider: bedrock");
    let bedrock = bedrock.replace("{provider: azure-openai}", "{provider: bedrock}");
    let (code, out, err) = check_with_anthropic_key(&bedrock);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(err.lines().filter(|l| l.contains(": route")).count(), 1, "Bedrock's regions are its own: {err}");
}

/// Two configurations that compile but do not do what their author meant, where a mistake costs
/// more than a warning can say afterwards: a Vertex AI route without an `endpoints` glob lets an
/// agent name any project the service account may use (and bill it); a JWKS file with no key
/// keyswap can use admits no one. `check` names both, and `--strict` fails on them.
#[test]
fn check_warns_of_a_vertex_route_any_project_can_be_named_through_and_a_keyless_jwks_file() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
    let config = format!(
        "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    validators: [{{name: idp, jwt: {{issuer: https://idp.test/, audiences: [keyswap], jwksFile: '{}'}}}}]\n---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: vertex}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: google, hosts: [us-central1-aiplatform.googleapis.com]}}, {{provider: google, hosts: [europe-west4-aiplatform.googleapis.com], endpoints: ['/v1/projects/my-project/*']}}]}}]\n---\napiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: k}}\nspec:\n  parentRefs: [{{name: vertex}}]\n  secretRef: {{name: anthropic}}\n  target: Header\n  headerName: x-goog-api-key\n---\n{}",
        jwks.display(),
        secret_manifest("anthropic", "token", ANTHROPIC_KEY)
    );
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let (code, out, err) = keyswap(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("host us-central1-aiplatform.googleapis.com (Vertex AI) has no `endpoints` glob"), "{err}");
    assert!(!err.contains("europe-west4"), "a route whose glob names the project: {err}");
    assert!(err.contains("validator idp: the JWKS file") && err.contains("admits no one"), "{err}");
    let (code, _, err) = keyswap(&["check", "--strict", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("2 warning(s), and --strict"), "{err}");
}

/// With `agentAuth.optional`, an agent over its own tenant or agent budget leaves its token out
/// and is counted with every anonymous caller instead: `check` says so.
#[test]
fn check_warns_that_optional_agent_auth_lets_a_caller_leave_its_own_budget() {
    for (key, warns) in [("Tenant", true), ("Gateway", false)] {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    optional: true\n    validators: [{{sharedToken: {{secretRef: {{name: t}}, agent: a, tenant: acme}}}}]\n---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: anthropic}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: anthropic}}]}}]\n---\napiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: k}}\nspec:\n  parentRefs: [{{name: anthropic}}]\n  secretRef: {{name: anthropic}}\n  target: Header\n---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {{name: daily}}\nspec:\n  parentRefs: [{{kind: EgressGateway, name: egress}}]\n  key: {key}\n  window: Day\n  limits: {{requests: 100}}\n---\n{}---\n{}",
            secret_manifest("t", "token", "shared-token-0001"),
            secret_manifest("anthropic", "token", ANTHROPIC_KEY)
        );
        std::fs::write(dir.path().join("config.yaml"), config).unwrap();
        let (code, out, err) = keyswap(&["check", "--config", dir.path().to_str().unwrap()]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert_eq!(err.contains("agentAuth is optional and budgets are kept per tenant"), warns, "{key}: {err}");
    }
}

/// A `jwt` validator that maps a tenant claim beside API-key agents with tenants: whoever its
/// identity provider lets choose the claim can name any tenant. `check` says so until the
/// validator has `tenants`.
#[test]
fn check_warns_that_a_validator_may_name_any_tenant() {
    for (tenants, warns) in [("", true), (", tenants: ['*']", true), (", tenants: ['partner-*']", false)] {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    validators:\n    - apiKeys: {{}}\n    - {{name: partner, jwt: {{issuer: https://idp.test/, audiences: [keyswap], hs256SecretRef: {{name: hs}}, claimMapping: {{tenant: org}}}}{tenants}}}\n---\n{}---\n{}",
            secret_manifest("hs", "token", "an-hs256-secret-of-at-least-32-bytes"),
            secret_manifest("anthropic", "token", ANTHROPIC_KEY)
        );
        std::fs::write(dir.path().join("config.yaml"), config).unwrap();
        let (code, out, err) = keyswap(&["check", "--config", dir.path().to_str().unwrap()]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert_eq!(err.contains("validator partner takes its callers' tenant"), warns, "{tenants}: {err}");
        // `--strict` fails CI on a warning.
        let (strict, _, _) = keyswap(&["check", "--strict", "--config", dir.path().to_str().unwrap()]);
        assert_eq!(strict, if warns { 4 } else { 0 }, "{tenants}");
    }
}

#[test]
fn check_passes_on_the_shipped_examples() {
    for dir in ["/manifests/examples", "/manifests/examples/echo-bot"] {
        let examples = format!("{}{dir}", env!("CARGO_MANIFEST_DIR"));
        let (code, out, err) = keyswap(&["check", "--config", &examples]);
        assert_eq!(code, 0, "{dir}: {out}\n{err}");
        assert!(out.ends_with("OK\n"), "{out}");
    }
}

#[test]
fn check_names_file_object_and_field_for_every_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {name: egress}
spec: {defaultPolicy: deny-some}
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {name: r}
spec:
  parentRefs: [{name: egress}]
  rules: [{matches: [{provider: opnai}]}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {name: p}
spec:
  parentRefs: [{name: r}]
  secretRef: {name: s, namespace: other-team}
  target: Header
"#,
    )
    .unwrap();
    let (code, _, err) = keyswap(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let file = dir.path().join("bad.yaml");
    let file = file.display();
    assert!(
        err.contains(&format!(
            "{file}: EgressGateway default/egress: field `spec.defaultPolicy`: unknown variant `deny-some`"
        )),
        "{err}"
    );
    // The gateway failed to parse, so the route's parent is missing too; both are reported.
    assert!(
        err.contains("AIProviderRoute default/r: field `spec.rules[0].matches[0].provider`: unknown provider `opnai`"),
        "{err}"
    );
    assert!(
        err.contains("CredentialInjectionPolicy default/p: field `spec.secretRef.namespace`: is not allowed"),
        "{err}"
    );
}

#[test]
fn explain_shows_route_policy_and_target_or_the_denial() {
    let dir = config_dir();
    let d = dir.path().to_str().unwrap();
    let (code, out, _) =
        keyswap(&["explain", "--config", d, "--host", "api.openai.com", "--path", "/v1/chat/completions"]);
    assert_eq!(code, 0);
    assert!(out.contains("decision: inject"), "{out}");
    assert!(out.contains("route default/openai"), "{out}");
    assert!(out.contains("policy default/openai-key"), "{out}");
    assert!(out.contains("writes header `authorization` = <redacted>"), "{out}");
    assert!(
        out.contains("strips the organization and project the agent names: headers openai-organization, openai-project, x-goog-user-project; query parameter userProject"),
        "{out}"
    );
    assert_no_secrets(&out);
    // A pinned organization is written, and no longer listed as stripped.
    let file = dir.path().join("config.yaml");
    let pinned = std::fs::read_to_string(&file).unwrap().replace(
        "  valuePrefix: \"Bearer \"\n",
        "  valuePrefix: \"Bearer \"\n  setHeaders: [{name: OpenAI-Organization, value: org-operator}]\n",
    );
    std::fs::write(&file, pinned).unwrap();
    let (code, out, err) = keyswap(&["explain", "-c", d, "--host", "api.openai.com", "--path", "/v1/models"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("writes header `openai-organization: org-operator` (spec.setHeaders"), "{out}");
    assert!(out.contains("agent names: headers openai-project, x-goog-user-project;"), "{out}");

    let (_, out, _) = keyswap(&["explain", "-c", d, "--host", "evil.example.com", "--path", "/?key=sk-agent"]);
    assert!(out.contains("decision: 403"), "{out}");
    assert!(!out.contains("sk-agent"), "query values are not echoed: {out}");

    let (_, out, _) = keyswap(&["explain", "-c", d, "--host", "missing-key.test"]);
    assert!(out.contains("decision: 503 (fail closed): Secret default/anthropic has no key `not-there`"), "{out}");

    let (_, out, _) = keyswap(&["explain", "-c", d, "--host", "allowed.example.com"]);
    assert!(out.contains("pass through untouched (no route; allowed by allow-list)"), "{out}");
}

/// An agent that cannot send TRACE sends POST with `X-HTTP-Method-Override: TRACE`; `explain`
/// judges the request as keyswap does on the wire.
#[test]
fn explain_judges_a_method_override_header_like_the_method_it_names() {
    let dir = config_dir();
    let d = dir.path().to_str().unwrap();
    let explain = |extra: &[&str]| {
        let mut args = vec!["explain", "-c", d, "--host", "api.openai.com", "--path", "/v1/chat/completions"];
        args.extend_from_slice(extra);
        let (code, out, err) = keyswap(&args);
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    for refused in
        [&["--method-override", "TRACE"][..], &["--method-override", " trace "], &["--method-override", "GET, TRACE"]]
    {
        let out = explain(refused);
        assert!(out.contains("decision: 405 method_not_allowed"), "{refused:?}: {out}");
        assert!(out.contains("with a method-override header"), "{refused:?}: {out}");
    }
    let out = explain(&["--method-override", "GET", "--method-override", "TRACE"]);
    assert!(out.contains("decision: 405"), "every override counts: {out}");
    let out = explain(&["--method", "POST", "--method-override", "patch"]);
    assert!(out.contains("decision: inject"), "an allowed override changes nothing: {out}");
}

/// `explain` says which deciding filter Envoy runs for the host and what it sends keyswap: the
/// per-request phases without tracing, the fixed ones with tracing on from the environment.
#[test]
fn explain_shows_the_phases_envoy_sends_for_the_host() {
    let dir = config_dir();
    let explain = |env: &[(&str, &str)], host: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
        cmd.args(["explain", "-c", dir.path().to_str().unwrap(), "--host", host]);
        cmd.args(["--path", "/v1/chat/completions"]);
        for k in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"] {
            cmd.env_remove(k);
        }
        cmd.env_remove("OTEL_TRACES_SAMPLER").envs(env.iter().copied());
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = explain(&[], "api.openai.com");
    assert!(out.contains("Envoy phases (tracing off in this environment): request headers, response headers; the request body only when this request needs it (filter envoy.filters.http.ext_proc)"), "{out}");
    // The host as an agent may spell it: another case, a port.
    let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    let out = explain(&[on], "API.OpenAI.com:443");
    assert!(out.contains("Envoy phases (tracing on, every request sampled): fixed for this host"), "{out}");
    assert!(out.contains("the request body up to Envoy's buffer (BUFFERED_PARTIAL)"), "{out}");
    assert!(!out.contains("SigV4 or a token budget here needs it whole"), "{out}");
    assert!(out.contains("filter keyswap.decide_bodies"), "{out}");
    // Spans of a fraction of the requests ask for bodies per request.
    let ratio = [on, ("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.1")];
    let out = explain(&ratio, "api.openai.com");
    assert!(out.contains("Envoy phases (tracing on, some requests sampled: their bodies asked for per request): request headers, response headers; the request body only when this request needs it (filter envoy.filters.http.ext_proc)"), "{out}");
}

#[test]
fn secret_from_env_fills_a_missing_secret_and_never_prints_it() {
    let dir = config_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["explain", "-c", dir.path().to_str().unwrap(), "--host", "missing-secret.test"])
        .args(["--secret-from-env", "does-not-exist/token=KS_TEST_KEY"])
        .env("KS_TEST_KEY", "sk-from-env-do-not-leak")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("decision: inject"), "{text}");
    assert!(text.contains(&keyswap::config::fingerprint(b"sk-from-env-do-not-leak")), "{text}");
    assert!(!text.contains("sk-from-env"), "{text}");

    let (code, _, err) =
        keyswap(&["check", "-c", dir.path().to_str().unwrap(), "--secret-from-env", "x/token=KS_UNSET_VAR"]);
    assert_eq!(code, 1);
    assert!(err.contains("KS_UNSET_VAR") && err.contains("not set"), "{err}");
}

#[test]
fn serve_refuses_to_start_on_an_invalid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.yaml"),
        "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: g}\nspec: {bogus: 1}\n",
    )
    .unwrap();
    let (code, _, err) = keyswap(&["serve", "-c", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot start")
            && err.contains("EgressGateway default/g: field `spec.bogus`: unknown field `bogus`"),
        "{err}"
    );
}

#[test]
fn help_explains_every_command() {
    let (code, out, _) = keyswap(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["serve", "check", "explain"] {
        assert!(out.contains(cmd), "{out}");
    }
    let (_, out, _) = keyswap(&["serve", "--help"]);
    for flag in [
        "--config",
        "--listen",
        "--uds",
        "--uds-mode",
        "--gateway",
        "--secret",
        "--log-format",
        "--allow-private-destination",
    ] {
        assert!(out.contains(flag), "serve --help lacks {flag}:\n{out}");
    }
}

/// The attack (a tenant with create rights on TokenBudgets, say): a number the API server stores
/// but keyswap cannot decode (`bytesPerInputToken: 5000000000` in a u32). The API server enforces
/// `minimum` and `maximum` but no `format`; an undecodable object fails its whole list, and the
/// watch never syncs. Every integer narrower than the API server's int64 carries its bounds.
#[test]
fn every_narrow_integer_in_the_crds_has_bounds_the_api_server_enforces() {
    let (code, out, err) = keyswap(&["crds"]);
    assert_eq!(code, 0, "{err}");
    fn walk(v: &serde_yaml_ng::Value, path: &str, bad: &mut Vec<String>) {
        match v {
            serde_yaml_ng::Value::Mapping(m) => {
                let fmt = m.get("format").and_then(|f| f.as_str());
                if matches!(fmt, Some("uint32" | "int32" | "uint8" | "uint16" | "int8" | "int16"))
                    && (m.get("maximum").is_none() || m.get("minimum").is_none())
                {
                    bad.push(path.to_owned());
                }
                for (k, v) in m {
                    walk(v, &format!("{path}.{}", k.as_str().unwrap_or("?")), bad);
                }
            }
            serde_yaml_ng::Value::Sequence(s) => s.iter().for_each(|v| walk(v, path, bad)),
            _ => {}
        }
    }
    let mut bad = Vec::new();
    for doc in out.split("\n---\n") {
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).unwrap();
        walk(&v, v["spec"]["names"]["kind"].as_str().unwrap_or("?"), &mut bad);
    }
    assert!(bad.is_empty(), "integers without maximum/minimum: {bad:?}");
}

#[test]
fn checked_in_crds_match_the_rust_types() {
    let (code, out, err) = keyswap(&["crds"]);
    assert_eq!(code, 0, "{err}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/crds/keyswap.dev.yaml");
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert!(
        out == checked_in,
        "manifests/crds/keyswap.dev.yaml is stale: regenerate it with `cargo run -- crds > manifests/crds/keyswap.dev.yaml`"
    );
    for needle in [
        "shortNames:\n    - egw",
        "shortNames:\n    - aipr",
        "shortNames:\n    - cip",
        "- ProviderAuth",
        "subresources:",
    ] {
        assert!(out.contains(needle), "CRDs lack `{needle}`");
    }
}

#[test]
fn check_and_explain_name_provider_auth_keys_without_values() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {name: egress}
spec: {}
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {name: ai}
spec:
  parentRefs: [{name: egress}]
  rules: [{matches: [{provider: bedrock}]}]
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {name: g}
spec:
  parentRefs: [{name: egress}]
  rules: [{matches: [{provider: google}]}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {name: keys}
spec:
  parentRefs: [{name: ai}]
  secretRef: {name: aws}
  target: ProviderAuth
  providerAuth: {type: AWSv4}
---
apiVersion: v1
kind: Secret
metadata: {name: aws}
stringData:
  AWS_ACCESS_KEY_ID: AKIAEXAMPLEKEYID
  AWS_SECRET_ACCESS_KEY: "wJalr/REAL-aws-secret-do-not-print"
"#;
    std::fs::write(dir.path().join("k.yaml"), text).unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, out, err) = keyswap(&[
        "explain",
        "--config",
        d,
        "--host",
        "bedrock-runtime.eu-central-1.amazonaws.com",
        "--path",
        "/model/m/converse",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("signs for region `eu-central-1`, service `bedrock`"), "{out}");
    assert!(!out.contains("wJalr") && !err.contains("wJalr"), "{out}{err}");

    // The same Secret without the secret key, and a google policy with a broken service-account key.
    let broken = text.replace("  AWS_SECRET_ACCESS_KEY: \"wJalr/REAL-aws-secret-do-not-print\"\n", "")
        + "---\napiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {name: gcp}\nspec:\n  parentRefs: [{name: g}]\n  secretRef: {name: sa}\n  target: ProviderAuth\n  providerAuth: {type: GCPServiceAccount}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: sa}\nstringData:\n  service-account.json: '{\"type\": \"service_account\", \"private_key\": \"-----BEGIN PRIVATE KEY-----\\nMIIsecret\\n\"}'\n";
    std::fs::write(dir.path().join("k.yaml"), broken).unwrap();
    let (code, out, err) = keyswap(&["check", "--config", d]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("UNRESOLVED (KeyNotFound): Secret default/aws has no key `AWS_SECRET_ACCESS_KEY`"), "{out}");
    assert!(
        out.contains("UNRESOLVED (InvalidSecret): Secret default/sa key `service-account.json` is not a service-account key: field `client_email` is missing or not a string"),
        "{out}"
    );
    assert!(!out.contains("MIIsecret") && !err.contains("MIIsecret"), "{out}{err}");
}

/// Every `keyswap <command> --flag` written in README.md and docs/ is a flag that command's
/// `--help` lists: a renamed flag cannot leave the docs behind.
#[test]
fn every_flag_the_docs_give_a_command_is_in_its_help() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut docs = vec![format!("{root}/README.md")];
    for e in std::fs::read_dir(format!("{root}/docs")).unwrap() {
        docs.push(e.unwrap().path().display().to_string());
    }
    let commands = ["token create", "envoy-config", "explain", "certs", "check", "serve", "dev", "crds"];
    let mut checked = 0;
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for line in text.lines() {
            let Some(at) = line.find("keyswap ") else { continue };
            let rest = &line[at + "keyswap ".len()..];
            let Some(cmd) = commands.iter().find(|c| rest.starts_with(**c)) else { continue };
            // The command's own words: up to the end of the code span or a pipe.
            let words = rest.split(['`', '|', '#']).next().unwrap_or("");
            let help = {
                let mut args: Vec<&str> = cmd.split(' ').collect();
                args.push("--help");
                keyswap(&args).1
            };
            for flag in words.split_whitespace().filter(|w| w.starts_with("--")) {
                let flag = flag.split('=').next().unwrap().trim_end_matches([',', ')', '.', ';']);
                assert!(help.contains(flag), "{doc}: `keyswap {cmd} {flag}` is not in `keyswap {cmd} --help`: {line}");
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} flags found in the docs");
}

/// Every kind `keyswap crds` defines is named wherever the help lists the kinds keyswap reads,
/// and every `kubectl get` of keyswap's kinds in the docs names each short name: a new kind
/// cannot be left out of them.
#[test]
fn every_kind_the_crds_define_is_named_in_the_help_and_the_docs_kubectl_lines() {
    let (code, crds, err) = keyswap(&["crds"]);
    assert_eq!(code, 0, "{err}");
    let field = |prefix: &str| -> Vec<String> {
        let lines: Vec<&str> = crds.lines().collect();
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with(prefix))
            .map(|(i, l)| {
                let v = l.trim_start()[prefix.len()..].trim();
                // `shortNames:` holds a list on the next line.
                if v.is_empty() {
                    lines[i + 1].trim().trim_start_matches("- ").to_owned()
                } else {
                    v.to_owned()
                }
            })
            .collect()
    };
    let kinds: Vec<String> = field("kind: ").into_iter().filter(|k| k != "CustomResourceDefinition").collect();
    let shorts = field("shortNames:");
    assert!(kinds.len() >= 4 && shorts.len() == kinds.len(), "kinds {kinds:?}, short names {shorts:?}");
    let (_, top, _) = keyswap(&["--help"]);
    let (_, crds_help, _) = keyswap(&["crds", "--help"]);
    let (_, serve, _) = keyswap(&["serve", "--help"]);
    let kubernetes_flag = serve.split("  --kubernetes\n").nth(1).and_then(|t| t.split("  --").next()).unwrap_or("");
    for kind in &kinds {
        assert!(top.contains(kind.as_str()), "`keyswap --help` does not name {kind}:\n{top}");
        assert!(crds_help.contains(kind.as_str()), "`keyswap crds --help` does not name {kind}:\n{crds_help}");
        let plural = format!("{kind}s").replace("Policys", "Policies");
        assert!(kubernetes_flag.contains(&plural), "`serve --kubernetes` help does not name {plural}:\n{serve}");
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let mut checked = 0;
    for e in std::fs::read_dir(format!("{root}/docs")).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines().filter(|l| l.contains("get egw,") || l.contains("watches egw,")) {
            for short in &shorts {
                assert!(line.contains(short.as_str()), "{}: `{short}` missing from: {line}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} kubectl lines found in docs/");
}

/// providers.md and configuration.md list what is stripped from every routed request: each
/// credential header and query parameter of the one list the code strips by.
#[test]
fn the_docs_name_every_credential_header_and_query_parameter_keyswap_strips() {
    let root = env!("CARGO_MANIFEST_DIR");
    let providers = std::fs::read_to_string(format!("{root}/docs/providers.md")).unwrap();
    let configuration = std::fs::read_to_string(format!("{root}/docs/configuration.md")).unwrap();
    for h in keyswap::vocab::CREDENTIAL_HEADERS {
        assert!(providers.contains(&format!("`{h}`")), "docs/providers.md does not name the stripped header `{h}`");
    }
    for q in keyswap::vocab::CREDENTIAL_QUERY_PARAMS {
        for (doc, text) in [("providers", &providers), ("configuration", &configuration)] {
            assert!(text.contains(&format!("`{q}`")), "docs/{doc}.md does not name the stripped query parameter `{q}`");
        }
    }
}

/// Without --static, `envoy-config` prints the ADS bootstrap, which the listener and cluster
/// flags do not shape: each one given is named in a warning, and the output is the same.
#[test]
fn envoy_config_over_ads_names_every_static_only_flag_it_was_given() {
    let dir = config_dir();
    let d = dir.path().to_str().unwrap();
    let (code, plain, err) = keyswap(&["envoy-config", "--config", d]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("ADS bootstrap does not use"), "{err}");
    let given = [
        ["--upstream", "api.anthropic.com=127.0.0.1:9"].as_slice(),
        &["--bind", "0.0.0.0"],
        &["--system-ca", "/nonexistent/ca.pem"],
        &["--observe-response-bodies"],
    ];
    for flag in given {
        let mut args = vec!["envoy-config", "--config", d];
        args.extend_from_slice(flag);
        let (code, out, err) = keyswap(&args);
        assert_eq!(code, 0, "{flag:?}: {err}");
        assert_eq!(out, plain, "{flag:?} changed the ADS bootstrap");
        assert!(err.contains(&format!("{} set, but the ADS bootstrap does not use them", flag[0])), "{flag:?}: {err}");
    }
}

/// On a host whose CA bundle is not where Debian keeps it, `certs` and `dev` warned and wrote a
/// `ca-bundle.crt` of the gateway CA alone, and Envoy (pointed at the missing file) refused every
/// provider cluster while `dev` said the gateway was up. Now they stop, naming `--system-ca`.
#[test]
fn a_missing_system_ca_bundle_stops_certs_and_names_the_flag() {
    let dir = config_dir();
    let out = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) =
        keyswap(&["certs", "--config", d, "--out", out.path().to_str().unwrap(), "--system-ca", "/nonexistent/ca.pem"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/ca.pem") && err.contains("--system-ca"), "{err}");
    assert!(!out.path().join("ca-bundle.crt").exists(), "a bundle of the gateway CA alone was written");
}

/// A duration past the time types' range (`--expires 9999999d`, `--leaf-lifetime 99999999d`)
/// panicked in `token create`, and as a leaf lifetime stopped every leaf being minted while
/// `/readyz` said ready. Both are refused when parsed, naming the flag; nothing is written.
#[test]
fn durations_past_their_range_are_refused_by_name_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.yaml");
    let o = out.to_str().unwrap();
    for expires in ["9999999d", "3651d", "0s"] {
        let (code, stdout, err) = keyswap(&["token", "create", "--agent", "a", "--expires", expires, "--output", o]);
        assert_eq!(code, 1, "{expires}: {err}");
        assert!(err.contains("--expires") && !err.contains("panicked"), "{expires}: {err}");
        assert!(stdout.is_empty() && !out.exists(), "{expires}: a token was made");
    }
    for lifetime in ["99999999d", "366d"] {
        let (code, _, err) = keyswap(&["serve", "--config", o, "--leaf-lifetime", lifetime]);
        assert_eq!(code, 2, "{lifetime}: {err}");
        assert!(err.contains("--leaf-lifetime") && err.contains("at most 365d"), "{lifetime}: {err}");
    }
}

/// The attack: a team with rights in its own namespace creates an EgressGateway there. A
/// keyswap watching every namespace without `--gateway` served "the only gateway", so from then
/// on every reload failed ("several EgressGateways"): rotations and revocations stopped, and a
/// new pod never became ready. It now refuses to start that way, before reaching the API server.
#[test]
fn kubernetes_mode_watching_every_namespace_needs_the_gateway_named() {
    let (code, _, err) = keyswap(&["serve", "--kubernetes"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--gateway NAMESPACE/NAME") && err.contains("every namespace"), "{err}");
}

/// The attack: an agent on the same host as a gateway set up from `envoy-config` opens Envoy's
/// admin on 127.0.0.1:9901 (unauthenticated): `/quitquitquit`, or `/logging?level=debug` to log
/// the real keys Envoy sends upstream. `--admin-socket` puts it on an owner-only Unix socket.
#[test]
fn envoy_config_can_put_envoys_admin_where_only_its_user_reaches_it() {
    let dir = config_dir();
    let d = dir.path().to_str().unwrap();
    let (code, out, err) = keyswap(&["envoy-config", "--config", d, "--admin-socket", "run/envoy-admin.sock"]);
    assert_eq!(code, 0, "{err}");
    let bootstrap: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
    let pipe = &bootstrap["admin"]["address"]["pipe"];
    let path = pipe["path"].as_str().unwrap();
    assert!(path.starts_with('/') && path.ends_with("/run/envoy-admin.sock"), "{path}");
    assert_eq!(pipe["mode"].as_u64(), Some(0o600));
    assert!(bootstrap["admin"]["address"]["socket_address"].is_null(), "{out}");
    let (code, _, err) = keyswap(&["envoy-config", "--config", d, "--admin-socket", "a.sock", "--admin-port", "9901"]);
    assert_eq!(code, 2, "both admin places were taken: {err}");
}

#[test]
fn check_and_explain_show_budgets_and_the_store_but_never_the_redis_password() {
    let dir = tempfile::tempdir().unwrap();
    let password = "redis-password-do-not-leak";
    let config = format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {{name: egress}}
spec:
  budgetStore: {{redis: {{secretRef: {{name: budget-redis}}}}}}
  agentAuth:
    validators: [{{sharedToken: {{secretRef: {{name: team-token}}, agent: builder, tenant: acme}}}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: openai}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: openai}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: key}}
spec:
  parentRefs: [{{name: openai}}]
  secretRef: {{name: openai}}
  target: Header
---
apiVersion: keyswap.dev/v1alpha1
kind: TokenBudget
metadata: {{name: acme-daily}}
spec:
  parentRefs: [{{kind: EgressGateway, name: egress}}]
  key: Tenant
  window: Day
  limits: {{totalTokens: 5000000, requests: 20000}}
  modelWeights: [{{model: "gpt-4o*", weight: 2}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: budget-redis}}
stringData: {{url: "rediss://keyswap:{password}@redis.internal:6380/0"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: team-token}}
stringData: {{token: team-token-0001-do-not-leak}}
---
apiVersion: v1
kind: Secret
metadata: {{name: openai}}
stringData: {{token: {OPENAI_KEY}}}
"#
    );
    std::fs::write(dir.path().join("gateway.yaml"), config).unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, out, err) = keyswap(&["check", "--config", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("budgets: default/acme-daily"), "{out}");
    assert!(out.contains("counted in Redis at redis.internal:6380 (Secret default/budget-redis)"), "{out}");
    assert!(out.contains("TokenBudget default/acme-daily: per Tenant per Day (UTC): requests 20000, totalTokens 5000000, weights gpt-4o* x2"), "{out}");
    let out = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["explain", "--config", d, "--host", "api.openai.com", "--path", "/v1/chat/completions"])
        .env("KEYSWAP_AGENT_TOKEN", "team-token-0001-do-not-leak")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("this request counts as `acme`"), "{text}");
    for t in [&text, &err] {
        assert!(!t.contains(password), "the Redis password was printed:\n{t}");
        assert_no_secrets(t);
    }
    // A URL that is not one: named with the Secret and key, without quoting it.
    let bad = std::fs::read_to_string(dir.path().join("gateway.yaml")).unwrap().replace("rediss://", "http://");
    std::fs::write(dir.path().join("gateway.yaml"), bad).unwrap();
    let (code, out, err) = keyswap(&["check", "--config", d]);
    assert_eq!(code, 3, "an unusable budget store is like an unresolved credential: exit 3");
    assert!(out.contains("store UNUSABLE: Secret default/budget-redis key `url` is not a Redis URL"), "{out}{err}");
    assert!(!out.contains(password) && !err.contains(password));
}

/// A collector's token in the endpoint's query never reaches the error that stops keyswap, also
/// when the machine has no CA certificates to verify the collector with (an image without the
/// bundle, `SSL_CERT_FILE` pointing at nothing).
#[test]
fn no_system_roots_error_hides_the_endpoint_query() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.yaml"),
        "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: g}\nspec: {}\n",
    )
    .unwrap();
    let missing = dir.path().join("no-such-bundle.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["serve", "-c", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4318/otlp?api_key=T0KEN-0013-do-not-leak")
        .env("SSL_CERT_FILE", &missing)
        .env("SSL_CERT_DIR", &missing)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("no system CA certificates") && text.contains("collector.example"), "{text}");
    assert!(!text.contains("T0KEN-0013"), "the collector's token in the output: {text}");
}

/// A gateway that names its collector (`spec.otlp.endpoint`) in an environment that switches
/// spans off (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`) exports nothing: Envoy must
/// not send it every response body for spans that never leave (12–15 % more of Envoy's CPU).
#[test]
fn spans_switched_off_by_the_environment_fix_no_body_phases() {
    let dir = config_dir();
    let config = standard_config().replacen("spec:\n", "spec:\n  otlp: {endpoint: \"http://127.0.0.1:4318\"}\n", 1);
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let explain = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
        cmd.args(["explain", "-c", dir.path().to_str().unwrap(), "--host", "api.openai.com"]);
        cmd.args(["--path", "/v1/chat/completions"]);
        for k in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_SDK_DISABLED"] {
            cmd.env_remove(k);
        }
        let out = cmd.envs(env.iter().copied()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = explain(&[]);
    assert!(out.contains("Envoy phases (tracing on, every request sampled): fixed for this host"), "{out}");
    for off in [("OTEL_SDK_DISABLED", "true"), ("OTEL_TRACES_EXPORTER", "none")] {
        let out = explain(&[off]);
        assert!(
            out.contains("Envoy phases (tracing off in this environment): request headers, response headers;"),
            "{off:?}: {out}"
        );
    }
}
