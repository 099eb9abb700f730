//! The provider registry: what keyswap knows about each AI provider.
//!
//! One table, read by the compiler (default hosts, default credential, which query
//! parameters carry keys) and by the request path (where the model sits in the path).
//! Adding a provider is adding a row to [`REGISTRY`].

use crate::glob;
pub use crate::vocab::{is_redacted, same_header, CREDENTIAL_HEADERS, CREDENTIAL_QUERY_PARAMS, PLACEHOLDER};
pub mod usage;

/// How a provider expects its static key by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderCredential {
    /// Lowercase header name.
    pub name: &'static str,
    /// Written before the secret value, e.g. `Bearer `.
    pub prefix: &'static str,
}

/// What in a request hides its usage ([`Provider::hides_usage`]): given the path and a header
/// lookup, the reason, if any.
pub type HidesUsage = Option<for<'h> fn(&str, &dyn Fn(&str) -> Option<&'h [u8]>) -> Option<&'static str>>;

/// Where a provider puts the model in the request path, when it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelInPath {
    /// The model travels in the JSON body (openai, anthropic): not visible at the headers phase.
    No,
    /// The path segment after this literal segment (azure `deployments/{d}/…`, bedrock
    /// `model/{id}/converse`, percent-decoded: Bedrock ids contain `:`, sent as `%3A`).
    After(&'static str),
    /// The same, cut at the first `:` (google `models/{m}:generateContent`).
    AfterUntilColon(&'static str),
}

/// One known endpoint: a path glob and the GenAI operation it performs.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub path: &'static str,
    pub operation: &'static str,
}

#[derive(Debug)]
pub struct Provider {
    /// The name used in `AIProviderRoute.spec.rules[].matches[].provider` and in keyswap's own
    /// telemetry (`keyswap.*`, budgets).
    pub name: &'static str,
    /// `gen_ai.provider.name` as the GenAI semantic conventions spell it (`aws.bedrock`,
    /// `azure.ai.openai`, …; `_OTHER` for an upstream they do not name), on spans and the
    /// `gen_ai_*` metrics, so that backends group keyswap's calls with other clients'.
    pub otel_name: &'static str,
    /// Hosts matched when a route names the provider but lists no hosts. `*` matches one DNS label.
    pub default_hosts: &'static [&'static str],
    /// The header a `target: Header` policy writes when it names none. `None`: the policy must say.
    pub default_header: Option<HeaderCredential>,
    /// Query parameters this provider accepts keys in; always stripped from agent requests.
    pub credential_query_params: &'static [&'static str],
    pub model_in_path: ModelInPath,
    pub endpoints: &'static [Endpoint],
    /// Path globs of requests that spend tokens whose use never comes back in the answer keyswap
    /// sees (batches, background and assistant runs, fine-tuning, realtime sessions, speech):
    /// a route with a token budget refuses them (`TokenBudget.spec.unmeteredRequests`). Only
    /// requests that create something (POST, PUT, PATCH) count; reading a batch's status is free.
    pub unmetered: &'static [&'static str],
    /// What in a request (its query, its headers) makes the answer leave out the usage keyswap
    /// settles by, or come in a format it does not read: such a request spends tokens no budget
    /// sees, and is unmetered as the `unmetered` paths are. `header` gives a header's value.
    pub hides_usage: HidesUsage,
    /// Whether response bodies are scrubbed of secrets toward the agent unless the route says
    /// (`spec.scrubResponseBodies`): the known providers never echo credentials in bodies; an
    /// unknown upstream (`custom`) may.
    pub scrub_bodies_by_default: bool,
    /// What a whole-label `*` of a default host pattern stands for, when the pattern alone
    /// covers names the provider never uses: Bedrock's `bedrock-runtime.*.amazonaws.com` also
    /// names `bedrock-runtime.s3.amazonaws.com`, an S3 bucket anyone can create. `None`: any label.
    pub wildcard_label: Option<fn(&str) -> bool>,
    /// Whether the `*` of its default host patterns is a name its customers choose (Azure's
    /// `RESOURCE.openai.azure.com`): a route relying on them sends the key (or an Entra token
    /// valid across resources) to any customer's resource an agent names, and `check` says so.
    pub customer_named_hosts: bool,
}

const OPENAI_UNMETERED: &[&str] = &[
    "/v1/batches",
    "/v1/threads/runs",
    "/v1/threads/*/runs",
    "/v1/threads/*/runs/*/submit_tool_outputs",
    "/v1/fine_tuning/jobs",
    "/v1/evals/*/runs",
    "/v1/vector_stores",
    "/v1/vector_stores/*/files",
    "/v1/vector_stores/*/file_batches",
    "/v1/realtime/*",
    "/v1/audio/speech",
    "/v1/videos",
    "/v1/videos/*/remix",
];

/// OpenAI's asynchronous APIs under any prefix: the compatible servers a `custom` route reaches
/// (LiteLLM, OpenRouter) serve batches and fine-tuning as OpenAI does, and Anthropic's batches.
const CUSTOM_UNMETERED: &[&str] = &[
    // `*/x`: `/x` after any prefix, whole segments (the canonical path starts with `/`).
    "*/batches",
    "*/threads/runs",
    "*/threads/*/runs",
    "*/threads/*/runs/*/submit_tool_outputs",
    "*/fine_tuning/jobs",
    "*/evals/*/runs",
    "*/vector_stores",
    "*/vector_stores/*/files",
    "*/vector_stores/*/file_batches",
    "*/realtime/*",
    "*/audio/speech",
    "*/videos",
    "*/videos/*/remix",
];

const OPENAI_ENDPOINTS: &[Endpoint] = &[
    Endpoint { path: "/v1/chat/completions", operation: "chat" },
    Endpoint { path: "/v1/responses", operation: "chat" },
    Endpoint { path: "/v1/completions", operation: "text_completion" },
    Endpoint { path: "/v1/embeddings", operation: "embeddings" },
];

pub const REGISTRY: &[Provider] = &[
    Provider {
        name: "openai",
        otel_name: "openai",
        default_hosts: &["api.openai.com"],
        default_header: Some(HeaderCredential { name: "authorization", prefix: "Bearer " }),
        credential_query_params: &[],
        model_in_path: ModelInPath::No,
        endpoints: OPENAI_ENDPOINTS,
        unmetered: OPENAI_UNMETERED,
        scrub_bodies_by_default: false,
        wildcard_label: None,
        customer_named_hosts: false,
        hides_usage: None,
    },
    Provider {
        name: "anthropic",
        otel_name: "anthropic",
        default_hosts: &["api.anthropic.com"],
        default_header: Some(HeaderCredential { name: "x-api-key", prefix: "" }),
        credential_query_params: &[],
        model_in_path: ModelInPath::No,
        endpoints: &[
            Endpoint { path: "/v1/messages", operation: "chat" },
            Endpoint { path: "/v1/chat/completions", operation: "chat" },
        ],
        unmetered: &["/v1/messages/batches"],
        scrub_bodies_by_default: false,
        wildcard_label: None,
        customer_named_hosts: false,
        hides_usage: None,
    },
    Provider {
        name: "google",
        otel_name: "gcp.gen_ai",
        default_hosts: &["generativelanguage.googleapis.com"],
        default_header: Some(HeaderCredential { name: "x-goog-api-key", prefix: "" }),
        credential_query_params: &["key"],
        model_in_path: ModelInPath::AfterUntilColon("models"),
        endpoints: &[
            Endpoint { path: "/*:generateContent", operation: "generate_content" },
            Endpoint { path: "/*:streamGenerateContent", operation: "generate_content" },
            Endpoint { path: "/*:embedContent", operation: "embeddings" },
            // The OpenAI-compatible endpoints (Gemini API and Vertex) and the Interactions API.
            Endpoint { path: "/*/chat/completions", operation: "chat" },
            Endpoint { path: "/*/embeddings", operation: "embeddings" },
            Endpoint { path: "/*/interactions", operation: "chat" },
        ],
        // Lowercase, as every `unmetered` glob: paths are compared lowercased.
        // Vertex's batch and tuning jobs; the Live API's ephemeral tokens (spent outside the
        // gateway); File Search imports, embedded by the provider.
        unmetered: &[
            "/*:batchgeneratecontent",
            "/*:asyncbatchembedcontent",
            "/*:predictlongrunning",
            "/*/batchpredictionjobs",
            "/*/tuningjobs",
            "/*/auth_tokens",
            "/*:importfile",
            "/*:uploadtofilesearchstore",
        ],
        scrub_bodies_by_default: false,
        wildcard_label: None,
        customer_named_hosts: false,
        hides_usage: Some(google_hides_usage),
    },
    Provider {
        name: "azure-openai",
        otel_name: "azure.ai.openai",
        default_hosts: &["*.openai.azure.com", "*.cognitiveservices.azure.com"],
        default_header: Some(HeaderCredential { name: "api-key", prefix: "" }),
        credential_query_params: &["api-key"],
        model_in_path: ModelInPath::After("deployments"),
        endpoints: &[
            Endpoint { path: "/openai/deployments/*/chat/completions", operation: "chat" },
            Endpoint { path: "/openai/deployments/*/embeddings", operation: "embeddings" },
            Endpoint { path: "/openai/v1/chat/completions", operation: "chat" },
            Endpoint { path: "/openai/v1/responses", operation: "chat" },
            Endpoint { path: "/openai/deployments/*/completions", operation: "text_completion" },
            Endpoint { path: "/openai/v1/embeddings", operation: "embeddings" },
        ],
        // Both API shapes: `/openai/…` with `api-version`, and `/openai/v1/…`.
        unmetered: &[
            "/openai/*batches",
            "/openai/*threads/runs",
            "/openai/*threads/*/runs",
            "/openai/*threads/*/runs/*/submit_tool_outputs",
            "/openai/*fine_tuning/jobs",
            "/openai/*vector_stores",
            "/openai/*vector_stores/*/files",
            "/openai/*vector_stores/*/file_batches",
            "/openai/*realtime*",
            "/openai/*audio/speech",
            "/openai/*video/*",
            "/openai/*videos",
            "/openai/*videos/*/remix",
            "/openai/*evals/*/runs",
        ],
        scrub_bodies_by_default: false,
        wildcard_label: None,
        customer_named_hosts: true,
        hides_usage: None,
    },
    Provider {
        name: "bedrock",
        otel_name: "aws.bedrock",
        default_hosts: &["bedrock-runtime.*.amazonaws.com"],
        // Bedrock API keys are bearer tokens; SigV4 is `target: ProviderAuth`.
        default_header: Some(HeaderCredential { name: "authorization", prefix: "Bearer " }),
        credential_query_params: &[],
        model_in_path: ModelInPath::After("model"),
        endpoints: &[
            Endpoint { path: "/model/*/converse", operation: "chat" },
            Endpoint { path: "/model/*/converse-stream", operation: "chat" },
            Endpoint { path: "/model/*/invoke", operation: "chat" },
            Endpoint { path: "/model/*/invoke-with-response-stream", operation: "chat" },
            Endpoint { path: "/openai/v1/chat/completions", operation: "chat" },
        ],
        unmetered: &["/async-invoke", "/model/*/invoke-with-bidirectional-stream", "/model-invocation-job"],
        scrub_bodies_by_default: false,
        wildcard_label: Some(is_aws_region),
        customer_named_hosts: false,
        hides_usage: None,
    },
    Provider {
        name: "custom",
        otel_name: "_OTHER",
        default_hosts: &[],
        default_header: None,
        credential_query_params: &[],
        model_in_path: ModelInPath::No,
        // An upstream keyswap does not know: the OpenAI-compatible paths self-hosted servers
        // (vLLM, Ollama, LiteLLM) serve are GenAI operations in its telemetry.
        endpoints: &[
            Endpoint { path: "/*/chat/completions", operation: "chat" },
            Endpoint { path: "/*/completions", operation: "text_completion" },
            Endpoint { path: "/*/embeddings", operation: "embeddings" },
            Endpoint { path: "/*/responses", operation: "chat" },
            Endpoint { path: "/*/messages", operation: "chat" },
        ],
        unmetered: CUSTOM_UNMETERED,
        scrub_bodies_by_default: true,
        wildcard_label: None,
        customer_named_hosts: false,
        hides_usage: None,
    },
];

/// Google's system parameters and headers (every Google API reads them) that leave
/// `usageMetadata` out of an answer or answer in a format keyswap does not read: a field mask
/// (`fields`, `X-Goog-FieldMask`), `alt` other than `json` or `sse` (`proto`, `media`), a JSONP
/// `callback`, and protobuf or gRPC bodies. Names read as credential names are
/// ([`crate::target::names_param`]); `alt=json;enum-encoding=int`, as Google's REST clients
/// send it, is JSON.
fn google_hides_usage<'h>(path: &str, header: &dyn Fn(&str) -> Option<&'h [u8]>) -> Option<&'static str> {
    const WHAT: &str = "a Google answer left without its usageMetadata, or in a format keyswap does not read \
                        (fields=, X-Goog-FieldMask, alt= other than json or sse, callback=, protobuf or gRPC)";
    let protobuf = |v: &[u8]| {
        let v = String::from_utf8_lossy(v).trim().to_ascii_lowercase();
        ["application/grpc", "application/x-protobuf", "application/protobuf", "application/x-google-protobuf"]
            .iter()
            .any(|p| v.starts_with(p))
    };
    if header("x-goog-fieldmask").is_some() || header("content-type").is_some_and(protobuf) {
        return Some(WHAT);
    }
    // Names read as leniently as credential names (`$fields`, `%24Fields`), `;` a separator too.
    let named = |name| crate::target::param_values(path, name).next().is_some();
    let json_or_sse = |v: &[u8]| {
        let format = String::from_utf8_lossy(v).to_ascii_lowercase();
        matches!(format.split(';').next().unwrap_or("").trim(), "json" | "sse")
    };
    if named("fields") || named("callback") || crate::target::param_values(path, "alt").any(|v| !json_or_sse(&v)) {
        return Some(WHAT);
    }
    None
}

pub fn lookup(name: &str) -> Option<&'static Provider> {
    REGISTRY.iter().find(|p| p.name == name)
}

pub fn names() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|p| p.name)
}

impl Provider {
    /// The model named in `path`, for providers that put it there.
    pub fn model_from_path<'a>(&self, path: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        let (segment, cut) = match self.model_in_path {
            ModelInPath::No => return None,
            ModelInPath::After(s) => (s, false),
            ModelInPath::AfterUntilColon(s) => (s, true),
        };
        let path = path.split('?').next().unwrap_or(path);
        let mut parts = path.split('/');
        // The segment in any case: a router that reads paths case-insensitively (Azure's) does.
        parts.by_ref().find(|p| p.eq_ignore_ascii_case(segment))?;
        let model = parts.next()?;
        let model = if cut { model.split(':').next().unwrap_or(model) } else { model };
        if model.is_empty() {
            return None;
        }
        Some(percent_encoding::percent_decode_str(model).decode_utf8_lossy())
    }

    /// The [`Provider::unmetered`] glob a request matches, if it `creates` something there
    /// ([`crate::target::check_methods`] says whether it does). The
    /// path is compared the way a lenient router may read it: percent-decoded, lowercased, empty
    /// and `.` segments dropped, `..` applied, `;parameters` cut off, without the query (an agent must not slip past
    /// with `/v1/b%61tches/` or `/v1//./batches`, whether or not Envoy normalized the path).
    pub fn unmetered(&self, creates: bool, path: &crate::target::CanonicalPath<'_>) -> Option<&'static str> {
        if self.unmetered.is_empty() || !creates {
            return None;
        }
        self.unmetered.iter().copied().find(|g| glob::matches(g, path, None))
    }

    /// Whether `host`, which the route host `pattern` matched (one DNS label per `*`), is a name
    /// the provider uses: where `pattern` is one of its default hosts, every label a whole-label
    /// `*` covers has the provider's [`Provider::wildcard_label`] shape. An operator's own pattern
    /// is taken as written (`keyswap check` warns of it: `foreign_host_patterns`).
    pub fn admits_host(&self, pattern: &str, host: &str) -> bool {
        let Some(shape) = self.wildcard_label else { return true };
        !self.default_hosts.contains(&pattern)
            || pattern.split('.').zip(host.split('.')).all(|(p, h)| p != "*" || shape(h))
    }

    /// The GenAI operation for a request path, when it is a known endpoint.
    pub fn operation(&self, path: &str) -> Option<&'static str> {
        let path = path.split('?').next().unwrap_or(path);
        self.endpoints.iter().find(|e| glob::matches(e.path, path, None)).map(|e| e.operation)
    }
}

/// An AWS region name: `us-east-1`, `us-gov-west-1`, `ap-southeast-2`, `us-isob-east-1`: two
/// letters, one or more words of letters, a number. Not `s3`, `s3-external-1`, `execute-api`.
pub fn is_aws_region(label: &str) -> bool {
    let letters = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase());
    let mut parts = label.split('-');
    let country = parts.next().unwrap_or_default();
    let Some(number) = parts.next_back() else { return false };
    let mut words = parts.peekable();
    country.len() == 2
        && letters(country)
        && words.peek().is_some()
        && words.all(letters)
        && (1..=2).contains(&number.len())
        && number.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::CanonicalPath;

    #[test]
    fn requests_that_spend_tokens_out_of_sight_are_recognised_however_the_path_is_spelled() {
        let openai = lookup("openai").unwrap();
        for path in [
            "/v1/batches",
            "/v1/batches/",
            "/v1/b%61tches",
            "/V1/Batches?x=1",
            "//v1//batches",
            "/v1/./batches",
            "/v1/x/../batches",
            "/v1/%2e/batches",
            "/v1/batches;jsessionid=1",
            "/v1%2fbatches",
            "/v1/threads/thread_1/runs",
        ] {
            assert!(openai.unmetered(true, &CanonicalPath::of(path)).is_some(), "{path}");
        }
        // Reading a batch's status, or a metered endpoint, is not refused.
        assert_eq!(openai.unmetered(false, &CanonicalPath::of("/v1/batches")), None);
        assert_eq!(openai.unmetered(true, &CanonicalPath::of("/v1/chat/completions")), None);
        assert_eq!(openai.unmetered(true, &CanonicalPath::of("/v1/batches/batch_1/cancel")), None);
        let google = lookup("google").unwrap();
        assert!(google
            .unmetered(true, &CanonicalPath::of("/v1beta/models/gemini-2.5-pro:batchGenerateContent"))
            .is_some());
        assert!(google.unmetered(true, &CanonicalPath::of("/v1beta/models/gemini-2.5-pro:generateContent")).is_none());
        assert!(lookup("anthropic").unwrap().unmetered(true, &CanonicalPath::of("/v1/messages/batches")).is_some());
        assert!(lookup("anthropic").unwrap().unmetered(true, &CanonicalPath::of("/v1/messages")).is_none());
        assert!(lookup("azure-openai").unwrap().unmetered(true, &CanonicalPath::of("/openai/v1/batches")).is_some());
        assert!(lookup("azure-openai")
            .unwrap()
            .unmetered(true, &CanonicalPath::of("/openai/batches?api-version=2024-10-21"))
            .is_some());
        assert!(lookup("bedrock").unwrap().unmetered(true, &CanonicalPath::of("/async-invoke")).is_some());
        for p in REGISTRY {
            for g in p.unmetered {
                assert_eq!(*g, g.to_ascii_lowercase(), "{}: unmetered globs are compared lowercased", p.name);
            }
        }
    }

    /// What hides a Gemini answer's usage, and what Google's own clients send and does not.
    #[test]
    fn google_requests_that_hide_their_usage_are_told_apart_from_its_clients_own() {
        let hides = lookup("google").unwrap().hides_usage.unwrap();
        let none = |_: &str| None;
        for path in [
            "/m:generateContent?fields=a",
            "/m:x?%24FIELDS=a",
            "/m:x?alt=proto",
            "/m:x?$alt=media",
            "/m:x?a=1&callback=f",
            "/m:x?alt=json;fields=a",
            "/m:x?alt=sse&alt=proto",
        ] {
            assert!(hides(path, &none).is_some(), "{path}");
        }
        for path in ["/m:generateContent", "/m:x?alt=sse", "/m:x?$alt=json;enum-encoding=int", "/m:x?key=k&alt=JSON"] {
            assert!(hides(path, &none).is_none(), "{path}");
        }
        for (name, value) in [
            ("x-goog-fieldmask", &b"candidates"[..]),
            ("content-type", b"application/x-protobuf"),
            ("content-type", b" Application/GRPC+proto"),
        ] {
            let header = |n: &str| (n == name).then_some(value);
            assert!(hides("/m:generateContent", &header).is_some(), "{name}: {value:?}");
        }
        let json = |n: &str| (n == "content-type").then_some(&b"application/json; charset=utf-8"[..]);
        assert!(hides("/m:generateContent", &json).is_none());
        assert!(lookup("openai").unwrap().hides_usage.is_none());
    }

    /// The attack: spend tokens through an asynchronous API the registry did not list: Vertex's
    /// batch prediction and tuning jobs, a Live API token minted to spend outside the gateway,
    /// File Search imports; Sora 2 and eval runs on Azure's v1 API; batches and fine-tuning on a
    /// `custom` OpenAI-compatible server. Each was admitted as one small request.
    #[test]
    fn asynchronous_apis_missing_from_the_registry_are_refused_as_unmetered() {
        let unmetered =
            |provider: &str, path: &str| lookup(provider).unwrap().unmetered(true, &CanonicalPath::of(path)).is_some();
        for path in [
            "/v1/projects/p/locations/us-central1/batchPredictionJobs",
            "/v1/projects/p/locations/us-central1/tuningJobs",
            "/v1alpha/auth_tokens",
            "/v1beta/fileSearchStores/store-1:importFile",
            "/upload/v1beta/fileSearchStores/store-1:uploadToFileSearchStore",
        ] {
            assert!(unmetered("google", path), "{path}");
        }
        for path in ["/openai/v1/videos", "/openai/v1/videos/video_1/remix", "/openai/v1/evals/eval_1/runs"] {
            assert!(unmetered("azure-openai", path), "{path}");
        }
        for path in ["/v1/batches", "/litellm/v1/fine_tuning/jobs", "/api/v1/messages/batches", "/v1/videos"] {
            assert!(unmetered("custom", path), "{path}");
        }
        for path in ["/v1/chat/completions", "/v1/embeddings", "/v1/messages", "/v1/responses", "/v1/microbatches"] {
            assert!(!unmetered("custom", path), "{path}");
        }
        assert!(unmetered("custom", "/batches"), "without a prefix");
        assert!(!unmetered(
            "google",
            "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:generateContent"
        ));
    }

    #[test]
    fn bedrocks_default_host_names_regions_not_other_aws_services_or_buckets() {
        let bedrock = lookup("bedrock").unwrap();
        let pattern = "bedrock-runtime.*.amazonaws.com";
        for region in ["us-east-1", "us-gov-west-1", "ap-southeast-2", "eu-central-2", "us-isob-east-1", "il-central-1"]
        {
            assert!(bedrock.admits_host(pattern, &format!("bedrock-runtime.{region}.amazonaws.com")), "{region}");
        }
        // The legacy S3 endpoints' virtual-hosted buckets, and other services' labels.
        for label in [
            "s3",
            "s3-external-1",
            "s3-us-west-2",
            "execute-api",
            "elb",
            "us-east",
            "us-east-123",
            "useast-1",
            "u1-east-1",
            "US-EAST-1",
            "us--1",
            "",
        ] {
            assert!(!bedrock.admits_host(pattern, &format!("bedrock-runtime.{label}.amazonaws.com")), "{label}");
        }
        // An operator's own pattern is theirs (check warns of it); other providers take any label.
        assert!(bedrock.admits_host(
            "*.bedrock-runtime.us-east-1.vpce.amazonaws.com",
            "vpce-0a1.bedrock-runtime.us-east-1.vpce.amazonaws.com"
        ));
        assert!(lookup("azure-openai").unwrap().admits_host("*.openai.azure.com", "x.openai.azure.com"));
        // The matcher checks shapes only in its scan of patterns, not in its lookup of `*.rest`.
        for p in REGISTRY.iter().filter(|p| p.wildcard_label.is_some()) {
            assert!(p.default_hosts.iter().all(|h| !h.starts_with("*.")), "{}", p.name);
        }
    }

    #[test]
    fn every_provider_is_found_by_name() {
        for name in ["openai", "anthropic", "google", "azure-openai", "bedrock", "custom"] {
            assert_eq!(lookup(name).unwrap().name, name);
        }
        assert!(lookup("OpenAI").is_none());
    }

    #[test]
    fn model_is_read_from_the_path_where_the_provider_puts_it() {
        let google = lookup("google").unwrap();
        assert_eq!(
            google.model_from_path("/v1beta/models/gemini-2.5-pro:generateContent?key=x"),
            Some("gemini-2.5-pro".into())
        );
        let bedrock = lookup("bedrock").unwrap();
        assert_eq!(
            bedrock.model_from_path("/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"),
            Some("anthropic.claude-3-haiku-20240307-v1:0".into())
        );
        let azure = lookup("azure-openai").unwrap();
        assert_eq!(
            azure.model_from_path("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"),
            Some("gpt4o".into())
        );
        assert_eq!(lookup("openai").unwrap().model_from_path("/v1/chat/completions"), None);
    }

    #[test]
    fn operations_come_from_the_endpoint_table() {
        let openai = lookup("openai").unwrap();
        assert_eq!(openai.operation("/v1/chat/completions"), Some("chat"));
        assert_eq!(openai.operation("/v1/embeddings?x=1"), Some("embeddings"));
        assert_eq!(openai.operation("/v1/files"), None);
        let google = lookup("google").unwrap();
        assert_eq!(google.operation("/v1beta/models/gemini:streamGenerateContent"), Some("generate_content"));
        // The OpenAI-compatible endpoints and Gemini's Interactions API are GenAI calls too.
        assert_eq!(google.operation("/v1beta/openai/chat/completions"), Some("chat"));
        assert_eq!(google.operation("/v1beta/interactions"), Some("chat"));
        assert_eq!(google.operation("/v1beta/interactions/abc123"), None);
        assert_eq!(lookup("bedrock").unwrap().operation("/openai/v1/chat/completions"), Some("chat"));
        assert_eq!(lookup("anthropic").unwrap().operation("/v1/chat/completions"), Some("chat"));
        let azure = lookup("azure-openai").unwrap();
        assert_eq!(azure.operation("/openai/deployments/d/chat/completions?api-version=1"), Some("chat"));
        assert_eq!(azure.operation("/openai/deployments/d/completions"), Some("text_completion"));
        // An upstream keyswap does not know (a self-hosted vLLM) keeps its GenAI telemetry on
        // the OpenAI-compatible paths.
        let custom = lookup("custom").unwrap();
        assert_eq!(custom.operation("/v1/chat/completions"), Some("chat"));
        assert_eq!(custom.operation("/v1/completions"), Some("text_completion"));
        assert_eq!(custom.operation("/v1/models"), None);
    }
}
